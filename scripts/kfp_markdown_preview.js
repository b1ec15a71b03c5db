// Preview a report.md as the Kubeflow Pipelines UI shows a Markdown artifact.
//   npm install markdown-to-jsx@7.7.17 react@18 react-dom@18
//   node scripts/kfp_markdown_preview.js report.md preview.html
//   chromium --headless --no-sandbox --screenshot=preview.png --window-size=1200,2400 file://$PWD/preview.html
// Renders a Markdown file the way the KFP UI's MarkdownViewer does (markdown-to-jsx 7.7.17, the
// version in kubeflow/pipelines frontend/package-lock.json; same options: raw HTML not parsed,
// content truncated at 400,000 characters) into a standalone HTML page with CSS close to the viewer's.
const fs = require('fs');
const React = require('react');
const { renderToStaticMarkup } = require('react-dom/server');
const md = require('markdown-to-jsx'); const Markdown = md.default || md;
const [src, out] = process.argv.slice(2);
const content = fs.readFileSync(src, 'utf8').substr(0, 50 * 1000 * 8);
const body = renderToStaticMarkup(React.createElement(Markdown, { options: { disableParsingRawHTML: true } }, content));
// close to the viewer's look: compact bold headings, h1/h2 underlined, grey code blocks, no table borders
const css = [
  'body{font-family:Roboto,Helvetica,sans-serif;font-size:14px;margin:24px;color:#333}',
  'h1,h2,h3,h4{font-size:1em;font-weight:700;margin:1em 0 1em}',
  'h1,h2{border-bottom:1px solid #eee;padding-bottom:.3em}',
  'pre,code{background:#f8f8f8;border-radius:5px}',
  'pre{border:1px solid #eee;padding:7px;margin:7px 0}',
].join('');
fs.writeFileSync(out, `<!doctype html><html><head><meta charset="utf-8"><style>${css}</style></head><body><div class="markdown-viewer">${body}</div></body></html>`);
console.log(`rendered ${content.length} characters; images: ${(body.match(/<img /g) || []).length}, data-URI images: ${(body.match(/<img[^>]+src="data:image/g) || []).length}`);
