// Playground images: a chosen file becomes the one element of a BYTES [-1, 1] input, sent with
// the binary extension (JSON BYTES are UTF-8 strings, so a picture cannot go as JSON).
(function () {
  "use strict";
  var box = document.getElementById("pg-image");
  var select = document.getElementById("pg-deployment");
  if (!box || !select) return;
  var examples = JSON.parse(document.getElementById("examples").textContent);
  var file = document.getElementById("pg-image-file");
  var inputName = document.getElementById("pg-image-input");

  // The name of the example request's BYTES input with one element per row, or null.
  function bytesInput(exampleText) {
    var example;
    try { example = JSON.parse(exampleText || "{}"); } catch (e) { return null; }
    var inputs = example.inputs || [];
    for (var i = 0; i < inputs.length; i++) {
      var shape = inputs[i].shape || [];
      if (inputs[i].datatype === "BYTES" && shape.length === 2 && shape[1] === 1) {
        return inputs[i].name;
      }
    }
    return null;
  }

  function show() {
    var name = bytesInput(examples[select.value]);
    box.hidden = !name;
    inputName.textContent = name || "";
    file.value = "";
  }
  select.addEventListener("change", show);
  document.getElementById("pg-image-clear").addEventListener("click", function () {
    file.value = "";
  });
  show();

  // The JSON header: the body's inputs, the file's input replaced by a binary one.
  function header(bodyText, name, size) {
    var request;
    try { request = JSON.parse(bodyText); } catch (e) { request = {}; }
    if (!request || typeof request !== "object") request = {};
    var described = { name: name, datatype: "BYTES", shape: [1, 1],
                      parameters: { binary_data_size: 4 + size } };
    var others = (request.inputs || []).filter(function (input) { return input.name !== name; });
    request.inputs = others.concat([described]);
    return request;
  }

  // Return a Promise of {body, headers} for the chosen file, or null when none is chosen.
  function request(bodyText) {
    if (box.hidden || !file.files || !file.files.length) return null;
    var chosen = file.files[0];
    return chosen.arrayBuffer().then(function (data) {
      var head = new TextEncoder().encode(JSON.stringify(
        header(bodyText, inputName.textContent, data.byteLength)));
      var length = new DataView(new ArrayBuffer(4));
      length.setUint32(0, data.byteLength, true);  // the element's 4-byte little-endian size
      return {
        body: new Blob([head, length.buffer, data]),
        headers: { "Content-Type": "application/octet-stream",
                   "Inference-Header-Content-Length": String(head.length) }
      };
    });
  }
  window.SwarmPlaygroundImage = { request: request };
})();
