// Every page: ask before a dangerous form is sent, and copy buttons for shown secrets.
(function () {
  "use strict";
  // <form data-confirm="Revoke key x?">: nothing is sent unless the user agrees.
  document.addEventListener("submit", function (event) {
    var form = event.target, question = form.dataset ? form.dataset.confirm : null;
    if (question && !window.confirm(question)) event.preventDefault();
  }, true);

  // <pre class="copy">: a Copy button beside it, which says when it copied.
  function addCopyButton(pre) {
    var button = document.createElement("button");
    button.type = "button";
    button.className = "copy-button secondary";
    button.textContent = "Copy";
    button.setAttribute("aria-label", "Copy to the clipboard");
    button.addEventListener("click", function () {
      var done = function () { button.textContent = "Copied"; setTimeout(function () { button.textContent = "Copy"; }, 2000); };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(pre.textContent).then(done, function () { selectText(pre); });
      } else {
        selectText(pre);
        try { if (document.execCommand("copy")) done(); } catch (e) { /* selected: copy by hand */ }
      }
    });
    pre.insertAdjacentElement("afterend", button);
  }
  function selectText(el) {
    var range = document.createRange();
    range.selectNodeContents(el);
    var selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }
  document.querySelectorAll("pre.copy").forEach(addCopyButton);
})();
