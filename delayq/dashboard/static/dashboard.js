// The dashboard's only script (the Content-Security-Policy allows no inline one).
"use strict";

// Pages marked data-refresh-s reload themselves, but not while the operator is typing,
// has typed something, or has ticked rows: a reload would throw that away.
(function () {
  var seconds = Number(document.body.getAttribute("data-refresh-s"));
  if (!seconds) {
    return;
  }
  function busy() {
    var active = document.activeElement;
    if (active && /^(INPUT|SELECT|TEXTAREA|BUTTON)$/.test(active.tagName)) {
      return true;
    }
    var fields = document.querySelectorAll("input:not([type=hidden]):not([type=checkbox])");
    for (var i = 0; i < fields.length; i++) {
      if (fields[i].value) {
        return true;
      }
    }
    return document.querySelector("input[type=checkbox]:checked") !== null;
  }
  setInterval(function () {
    if (!busy()) {
      location.reload();
    }
  }, seconds * 1000);
})();

// "Select all" ticks every row of the dead-letter page.
(function () {
  var all = document.getElementById("select-all");
  if (!all) {
    return;
  }
  all.addEventListener("change", function () {
    var boxes = document.querySelectorAll("input[name=firing]");
    for (var i = 0; i < boxes.length; i++) {
      boxes[i].checked = all.checked;
    }
  });
})();
