// A small Markdown renderer that cannot inject HTML: the text is HTML-escaped first, and only the
// tags below are ever produced. Links are kept only for http(s) URLs; images only for plain file
// names next to the page (the evaluation report's charts).
"use strict";

const Markdown = (() => {
  function escapeHtml(text) {
    return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }

  function inline(text, options) {
    const codes = [];
    // Code spans first, so that nothing inside them is formatted.
    text = text.replace(/`([^`\n]+)`/g, (_, code) => { codes.push(code); return `\u0000${codes.length - 1}\u0000`; });
    text = text.replace(/!\[([^\]]*)\]\(([A-Za-z0-9_.\-]+\.png)\)/g, (_, alt, src) =>
      `<img alt="${alt}" src="${options.imageBase || ""}${src}">`);
    text = text.replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, (_, label, url) =>
      `<a href="${url}" target="_blank" rel="noopener noreferrer nofollow">${label}</a>`);
    text = text.replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>");
    text = text.replace(/(^|[^*\w])\*([^*\s][^*]*)\*(?!\w)/g, "$1<em>$2</em>");
    text = text.replace(/(^|[^_\w])_([^_\s][^_]*)_(?!\w)/g, "$1<em>$2</em>");
    return text.replace(/\u0000(\d+)\u0000/g, (_, i) => `<code>${codes[Number(i)]}</code>`);
  }

  function table(lines, options) {
    const cells = (line) => line.replace(/^\s*\|/, "").replace(/\|\s*$/, "").split("|").map((c) => c.trim());
    const head = cells(lines[0]).map((c) => `<th>${inline(c, options)}</th>`).join("");
    const rows = lines.slice(2).map((l) => "<tr>" + cells(l).map((c) => `<td>${inline(c, options)}</td>`).join("") + "</tr>");
    return `<table><thead><tr>${head}</tr></thead><tbody>${rows.join("")}</tbody></table>`;
  }

  function block(lines, options) {
    const first = lines[0];
    const heading = /^(#{1,6})\s+(.*)$/.exec(first);
    if (heading && lines.length === 1) {
      const level = heading[1].length;
      return `<h${level}>${inline(heading[2], options)}</h${level}>`;
    }
    if (lines.every((l) => /^\s*[-*+]\s+/.test(l))) {
      return "<ul>" + lines.map((l) => `<li>${inline(l.replace(/^\s*[-*+]\s+/, ""), options)}</li>`).join("") + "</ul>";
    }
    if (lines.every((l) => /^\s*\d+[.)]\s+/.test(l))) {
      return "<ol>" + lines.map((l) => `<li>${inline(l.replace(/^\s*\d+[.)]\s+/, ""), options)}</li>`).join("") + "</ol>";
    }
    if (lines.every((l) => /^&gt;\s?/.test(l))) {
      return `<blockquote>${inline(lines.map((l) => l.replace(/^&gt;\s?/, "")).join("<br>"), options)}</blockquote>`;
    }
    if (lines.length >= 2 && /^\s*\|/.test(first) && /^\s*\|?\s*:?-{2,}/.test(lines[1])) {
      return table(lines, options);
    }
    return `<p>${lines.map((l) => inline(l, options)).join("<br>")}</p>`;
  }

  // Markdown text -> HTML string built only from escaped text and the tags above.
  function render(source, options = {}) {
    const text = escapeHtml(String(source)).replace(/\r\n?/g, "\n");
    const out = [];
    const parts = text.split(/^```[^\n]*\n?/m);
    parts.forEach((part, i) => {
      if (i % 2 === 1) {  // inside a fenced code block (an unclosed fence runs to the end, as while streaming)
        out.push(`<pre><code>${part.replace(/\n$/, "")}</code></pre>`);
        return;
      }
      let lines = [];
      const flush = () => { if (lines.length) out.push(block(lines, options)); lines = []; };
      for (const line of part.split("\n")) {
        if (!line.trim()) { flush(); continue; }
        if (/^#{1,6}\s/.test(line)) { flush(); lines.push(line); flush(); continue; }
        lines.push(line);
      }
      flush();
    });
    return out.join("\n");
  }

  return { render, escapeHtml };
})();
