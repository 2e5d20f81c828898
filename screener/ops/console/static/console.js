// Progressive enhancement only: every page works without this script.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // Ask before admin actions that change what the PACS receives or which model serves.
  for (const form of document.querySelectorAll("form.confirm")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm || "Are you sure?")) event.preventDefault();
    });
  }
  // The correct class only matters for "disagree": pick it there, and select "disagree" when a class is chosen.
  const select = document.getElementById("correct-class");
  const disagree = document.getElementById("decision-disagree");
  if (select && disagree) {
    select.addEventListener("change", () => { if (select.value) disagree.checked = true; });
  }
  // Refresh the dashboard every minute while it is visible.
  if (document.getElementById("instances-total")) {
    window.setInterval(() => { if (!document.hidden) window.location.reload(); }, 60000);
  }
});
