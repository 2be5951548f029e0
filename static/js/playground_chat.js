// Playground chat: a generative deployment (kinds[name] === "chat") gets a chat whose answers
// stream in token by token. POST /v1/chat/completions with stream: true (the model's chat
// template applies); where that endpoint is missing (a 404 or 405 from an older gateway), the
// replica's /v2/models/NAME/generate_stream with the transcript as text. Stop aborts the
// fetch: the connection closes and the replica frees the sequence's slot. When the model
// refuses the prompt as too long for its context (tiny-lm has 512 tokens: two or three turns),
// the oldest turns are left out, one at a time, and the turn is sent again; their rows are
// dimmed and the state says how many were left out. A system message is always kept.
(function () {
  "use strict";
  var chat = document.getElementById("pg-chat");
  var select = document.getElementById("pg-deployment");
  if (!chat || !select) return;
  var kinds = JSON.parse(document.getElementById("pg-kinds").textContent);
  var csrf = document.querySelector("#playground-form input[name=csrfmiddlewaretoken]").value;
  var list = document.getElementById("pg-chat-messages");
  var prompt = document.getElementById("pg-chat-prompt");
  var errorBox = document.getElementById("pg-chat-error");
  var state = document.getElementById("pg-chat-state");
  var sendButton = document.getElementById("pg-chat-send");
  var stopButton = document.getElementById("pg-chat-stop");
  var messages = [];  // the transcript sent with each turn: {role, content}
  var rows = [];  // rows[i]: the list row of messages[i] (dimmed when it is left out)
  var leftOut = 0;  // turns left out of the transcript since the last Clear
  var controller = null;  // the AbortController of the answer being streamed
  var useChatEndpoint = true;  // false once /v1/chat/completions answered 404 or 405

  function isChat() { return kinds[select.value] === "chat"; }

  function showMode() {
    if (controller) controller.abort();
    finished("");
    messages = [];
    rows = [];
    leftOut = 0;
    list.textContent = "";
    showError("");
    state.textContent = "";
    chat.hidden = !isChat();
    document.getElementById("pg-tensor").hidden = isChat();
    if (isChat()) document.getElementById("pg-result").hidden = true;
  }

  function showError(text) {
    errorBox.textContent = text;
    errorBox.hidden = !text;
  }

  // Append a message row; return the element its text goes into (text nodes only: a model's
  // output is untrusted).
  function addRow(role, text) {
    var row = document.createElement("li");
    row.className = "chat-" + role;
    var who = document.createElement("strong");
    who.textContent = role + ": ";
    var body = document.createElement("span");
    body.className = "chat-text";
    body.textContent = text;
    row.appendChild(who);
    row.appendChild(body);
    list.appendChild(row);
    return body;
  }

  function options() {
    var maxTokens = Number(document.getElementById("pg-chat-max-tokens").value);
    var temperature = Number(document.getElementById("pg-chat-temperature").value);
    if (!Number.isInteger(maxTokens) || maxTokens < 1) throw new Error("max tokens: a whole number, 1 or more");
    if (!isFinite(temperature) || temperature < 0) throw new Error("temperature: a number, 0 or more");
    return { max_tokens: maxTokens, temperature: temperature };
  }

  function post(url, body, signal) {
    return fetch(url, {
      method: "POST", credentials: "same-origin", signal: signal, body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", "Accept": "text/event-stream",
                 "X-CSRFToken": csrf }
    });
  }

  function chatRequest(model, sampling, signal) {
    return post("/v1/chat/completions", { model: model, messages: messages, stream: true,
                                          max_tokens: sampling.max_tokens,
                                          temperature: sampling.temperature }, signal);
  }

  function generateRequest(model, sampling, signal) {
    var transcript = messages.map(function (m) { return m.role + ": " + m.content; });
    return post("/v2/models/" + encodeURIComponent(model) + "/generate_stream",
                { text_input: transcript.join("\n") + "\nassistant:", parameters: sampling },
                signal);
  }

  // Return a Promise of the streaming response, falling back to generate_stream once.
  function open(model, sampling, signal) {
    if (!useChatEndpoint) return generateRequest(model, sampling, signal);
    return chatRequest(model, sampling, signal).then(function (response) {
      if (response.status !== 404 && response.status !== 405) return response;
      return generateRequest(model, sampling, signal).then(function (fallback) {
        if (fallback.ok) useChatEndpoint = false;
        return fallback.ok ? fallback : response;
      });
    });
  }

  function remember(message, row) {
    messages.push(message);
    rows.push(row);
  }

  // Leave the oldest turn (a user message and the answers after it) out of the transcript;
  // return whether there was one to leave out besides the turn being sent.
  function leaveOutOldestTurn() {
    var first = 0;
    while (first < messages.length && messages[first].role === "system") first += 1;
    var end = first + 1;
    while (end < messages.length && messages[end].role !== "user") end += 1;
    if (end >= messages.length) return false;  // only the turn being sent is left
    rows.splice(first, end - first).forEach(function (row) { row.classList.add("chat-left-out"); });
    messages.splice(first, end - first);
    leftOut += 1;
    return true;
  }

  // Whether a refusal says the prompt leaves no room in the model's context: "max_tokens must
  // be an integer from 1 to N" (N: what the context has left), or a prompt over the context.
  function tooLongForContext(response, description) {
    return response.status === 400 &&
      /max_tokens must be|context|prompt plus max_tokens/.test(description);
  }

  // Return a Promise of the streaming response, leaving out old turns while the model says
  // the transcript is too long; reject with the refusal's description otherwise.
  function openWithinContext(model, sampling, signal) {
    return open(model, sampling, signal).then(function (response) {
      if (response.ok) return response;
      return describeFailure(response).then(function (description) {
        if (tooLongForContext(response, description) && leaveOutOldestTurn()) {
          return openWithinContext(model, sampling, signal);
        }
        throw new Error(description);
      });
    });
  }

  function leftOutNote() {
    if (!leftOut) return "";
    return " (" + leftOut + (leftOut === 1 ? " earlier turn" : " earlier turns") +
      " left out: the model's context is full)";
  }

  // Return "STATUS: message" from an error response's JSON {"error": ...}, else its text.
  function describeFailure(response) {
    return response.text().then(function (text) {
      var message = text;
      try {
        var body = JSON.parse(text);
        var error = body.error || body.detail || text;
        message = typeof error === "string" ? error : (error.message || JSON.stringify(error));
      } catch (e) { /* not JSON: show the text as it is */ }
      return response.status + " " + response.statusText + ": " + (message || "no details");
    });
  }

  // One event's data -> {text, finish, usage, error}; both stream shapes are read.
  function parseEvent(data) {
    var event = JSON.parse(data);
    if (event.error) {
      var error = event.error;
      return { error: typeof error === "string" ? error : (error.message || JSON.stringify(error)) };
    }
    if (event.choices) {
      var choice = event.choices[0] || {};
      return { text: (choice.delta && choice.delta.content) || choice.text || "",
               finish: choice.finish_reason, usage: event.usage };
    }
    return { text: event.text_output || "", finish: event.finish_reason, usage: event.usage };
  }

  function finished(outcome) {
    controller = null;
    sendButton.disabled = false;
    stopButton.disabled = true;
    state.textContent = outcome;
  }

  function send(event) {
    event.preventDefault();
    if (controller) return;
    var text = prompt.value.trim();
    var sampling;
    try {
      if (!text) throw new Error("type a message first");
      sampling = options();
    } catch (error) { showError(error.message); return; }
    showError("");
    var before = { messages: messages.slice(), rows: rows.slice(), leftOut: leftOut };
    remember({ role: "user", content: text }, addRow("user", text).parentNode);
    prompt.value = "";
    var answer = addRow("assistant", "");
    var reply = "";
    var finish = null;
    var usage = null;
    controller = new AbortController();
    sendButton.disabled = true;
    stopButton.disabled = false;
    state.textContent = "waiting for the first token...";
    openWithinContext(select.value, sampling, controller.signal).then(function (response) {
      state.textContent = "streaming...";
      return window.SwarmSse.read(response, function (data) {
        if (data === "[DONE]") return true;
        var parsed = parseEvent(data);
        if (parsed.error) throw new Error(parsed.error);
        if (parsed.text) {
          reply += parsed.text;
          answer.textContent = reply;
        }
        if (parsed.finish) finish = parsed.finish;
        if (parsed.usage) usage = parsed.usage;
        return false;
      });
    }).then(function () {
      if (!list.contains(answer)) return;  // the chat was cleared meanwhile
      remember({ role: "assistant", content: reply }, answer.parentNode);
      var tokens = usage && usage.completion_tokens;
      finished("done: " + (finish || "end of stream") + (tokens ? ", " + tokens + " tokens" : "") +
               leftOutNote());
    }).catch(function (error) {
      if (!list.contains(answer)) return;  // the chat was cleared meanwhile
      if (error && error.name === "AbortError") {
        if (reply) remember({ role: "assistant", content: reply }, answer.parentNode);
        answer.parentNode.classList.add("chat-stopped");
        finished("stopped");
        return;
      }
      // A bad event or an error event mid-stream: hang up, so the replica frees the slot.
      if (controller) controller.abort();
      if (!reply) {  // nothing came: take the turn back (and the turns left out for it)
        messages = before.messages;
        rows = before.rows;
        leftOut = before.leftOut;
        rows.forEach(function (row) { row.classList.remove("chat-left-out"); });
        list.removeChild(answer.parentNode);
        list.removeChild(list.lastChild);
        prompt.value = text;
      }
      showError(String(error && error.message ? error.message : error));
      finished("failed");
    });
  }

  chat.addEventListener("submit", send);
  stopButton.addEventListener("click", function () { if (controller) controller.abort(); });
  document.getElementById("pg-chat-clear").addEventListener("click", showMode);
  prompt.addEventListener("keydown", function (event) {
    // Shift+Enter: a new line; Enter while an input method composes a character: not a send.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) send(event);
  });
  select.addEventListener("change", showMode);
  showMode();
})();
