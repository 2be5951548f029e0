// Server-Sent Events over fetch: EventSource cannot POST, so the Playground reads the response
// body with a ReadableStream reader and splits it into events itself.
(function () {
  "use strict";

  // Return the data of one event block (its "data:" lines joined by newlines), or null when it
  // has none (a comment such as ": keep-alive", or an event of other fields only).
  function eventData(block) {
    var data = [];
    block.split(/\r\n|\r|\n/).forEach(function (line) {
      if (line.indexOf("data:") !== 0) return;
      var value = line.slice(5);
      data.push(value.charAt(0) === " " ? value.slice(1) : value);
    });
    return data.length ? data.join("\n") : null;
  }

  // Read `response`'s body to its end, calling onData(string) once per event, in order; the
  // Promise resolves when the stream ends and rejects as the reader does (an AbortError when
  // the fetch's signal fired). onData may return true to stop reading early ([DONE]).
  function read(response, onData) {
    var reader = response.body.getReader();
    var decoder = new TextDecoder();  // stream: true keeps a character split across reads
    var buffer = "";
    function drain(final) {
      // Events end with a blank line; whatever follows the last one waits for more bytes.
      var parts = buffer.split(/\r\n\r\n|\n\n|\r\r/);
      buffer = final ? "" : parts.pop();
      for (var i = 0; i < parts.length; i++) {
        var data = eventData(parts[i]);
        if (data !== null && onData(data) === true) return true;
      }
      return false;
    }
    function next() {
      return reader.read().then(function (chunk) {
        if (chunk.done) {
          buffer += decoder.decode();
          drain(true);
          return;
        }
        buffer += decoder.decode(chunk.value, { stream: true });
        if (drain(false)) return reader.cancel();
        return next();
      });
    }
    return next();
  }

  window.SwarmSse = { read: read, eventData: eventData };
})();
