// Upload with a progress bar: post the form with XMLHttpRequest, which reports upload progress.
(function () {
  "use strict";
  var form = document.getElementById("upload-form");
  if (!form || !window.XMLHttpRequest) return;
  var box = document.getElementById("upload-progress");
  var bar = box.querySelector("progress");
  var percent = box.querySelector(".percent");
  var phase = box.querySelector(".phase");
  var errorBox = document.getElementById("upload-error");

  // After a refusal the bar starts again from nothing (it must not stay at 100 %).
  function resetProgress() {
    bar.value = 0;
    percent.textContent = "0%";
    phase.textContent = phase.dataset.initial || "";
    box.hidden = true;
  }

  function showError(message) {
    resetProgress();
    errorBox.textContent = message;
    errorBox.hidden = false;
    form.querySelector("button[type=submit]").disabled = false;
  }
  phase.dataset.initial = phase.textContent;

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    errorBox.hidden = true;
    form.querySelector("button[type=submit]").disabled = true;
    box.hidden = false;
    var xhr = new XMLHttpRequest();
    xhr.open("POST", form.action || window.location.href);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.addEventListener("progress", function (e) {
      if (!e.lengthComputable) return;
      var p = Math.round((e.loaded / e.total) * 100);
      bar.value = p;
      percent.textContent = p + "%";
      if (p >= 100) phase.textContent = "validating the model…";
    });
    xhr.addEventListener("load", function () {
      var body = {};
      try { body = JSON.parse(xhr.responseText); } catch (e) { body = {}; }
      if (xhr.status === 201 && body.redirect) {
        window.location.assign(body.redirect);
      } else {
        showError(body.error || ("upload failed with status " + xhr.status));
      }
    });
    xhr.addEventListener("error", function () { showError("the upload was interrupted"); });
    xhr.send(new FormData(form));
  });
})();
