"use strict";
// Render the run's report/report.md with the same safe Markdown renderer as the chat.
fetch("/report/report.md")
  .then((r) => { if (!r.ok) throw new Error(`HTTP ${r.status}`); return r.text(); })
  .then((text) => { document.getElementById("report").innerHTML = Markdown.render(text, { imageBase: "/report/" }); })
  .catch((err) => { document.getElementById("report").textContent = `Could not load the report: ${err.message}`; });
