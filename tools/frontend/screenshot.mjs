// Screenshots a workflow as the REAL ComfyUI front end draws it (headless Chromium): loads the JSON with
// app.loadGraphData, fits the view to every node, closes dialogs, toasts, banners and menus, hides the app's chrome
// (focus mode) and saves the page at the given size. Also reports, per Story Prompt node, what its live preview
// shows, and checks that app.graph.serialize() keeps each node's widgets_values as the file has them (an extension's
// DOM widget must not add an entry). Not used by CI; see tools/frontend/README.md.
//
//   node tools/frontend/screenshot.mjs --workflow workflows/x.json [--out workflows/x.jpg] [--width 800]
//        [--height 500] [--quality 80] [--url http://127.0.0.1:8199] [--margin 40] [--max-scale 1.2]
//        [--renderer litegraph|vue]   (vue: the Nodes 2.0 renderer, front end 1.3x+ setting Comfy.VueNodes.Enabled)
//        [--fit NODE_CLASS]           (fit only the nodes of that class, e.g. StoryKitStoryPrompt, instead of all)
//        [--expect Mia,Otto]          (fail unless every Story Prompt preview shows each of these words)
//   --workflow takes a comma-separated list too; --out is then ignored and each goes next to its JSON as .jpg.
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';

const require = createRequire(process.env.PLAYWRIGHT_DIR ? path.join(process.env.PLAYWRIGHT_DIR, 'x.js') : import.meta.url);
const { chromium } = require('playwright-core');

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) =>
  (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []));
if (!args.workflow) {
  console.error('usage: screenshot.mjs --workflow FILE [--out FILE.(png|jpg)] [--width W] [--height H] [--quality Q]');
  process.exit(2);
}
const url = args.url ?? 'http://127.0.0.1:8199';
const width = Number(args.width ?? 800);
const height = Number(args.height ?? 500);
const quality = Number(args.quality ?? 80);
const margin = Number(args.margin ?? 40);
const maxScale = Number(args['max-scale'] ?? 1.2);
const renderer = args.renderer ?? 'litegraph';
const fitClass = args.fit ?? null;
const expect = args.expect ? args.expect.split(',') : [];
const workflows = args.workflow.split(',').map((f) => path.resolve(f));
const outFor = (file) => path.resolve(workflows.length === 1 && args.out ? args.out : file.replace(/\.json$/, '.jpg'));

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});
const page = await browser.newPage({ viewport: { width, height } });
const log = [];
page.on('console', (m) => log.push(`[${m.type()}] ${m.text()}`));
page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
page.on('response', (r) => { if (r.status() >= 400) log.push(`[http ${r.status()}] ${r.url()}`); });
await page.goto(url, { waitUntil: 'load' });
await page.waitForFunction(() => window.app?.graph && window.LiteGraph && window.app.vueAppReady !== false, null,
  { timeout: 120000 });
await page.waitForTimeout(2000);
await page.evaluate(async () => {
  const set = (id, value) => app.extensionManager.setting.set(id, value).catch(() => {});
  await set('Comfy.Minimap.Visible', false);
  await set('Comfy.Workflow.ShowMissingModelsWarning', false);
  await set('Comfy.Workflow.ShowMissingNodesWarning', false);
  await set('Comfy.Graph.CanvasInfo', false);
  // Draw text and widgets at any zoom (newer front ends switch to low-detail drawing below about 0.6).
  await set('LiteGraph.Canvas.MinFontSizeForLOD', 0);
  await set('LiteGraph.Canvas.LowQualityRenderingZoomThreshold', 0.1);
}, null);
const vue = await page.evaluate(async (on) => {
  await app.extensionManager.setting.set('Comfy.VueNodes.Enabled', on).catch(() => {});
  return app.extensionManager.setting.get('Comfy.VueNodes.Enabled') ?? null;
}, renderer === 'vue');
console.log(`front end ${await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__)}, renderer ${renderer}` +
  ` (Comfy.VueNodes.Enabled = ${vue})`);
if (renderer === 'vue' && vue !== true) { console.log('this front end has no Nodes 2.0 renderer'); process.exit(1); }

// Closes whatever covers the canvas, as a user would: Escape for dialogs and menus, the close buttons of toasts and
// of the "Introducing Nodes 2.0" banner.
async function clearOverlays() {
  for (let i = 0; i < 3; i++) await page.keyboard.press('Escape');
  await page.locator('xpath=//span[contains(., "Introducing Nodes 2.0")]/ancestor::div[2]/button').first()
    .click({ timeout: 1000 }).catch(() => {});
  for (const close of await page.locator('.p-toast-close-button, .p-dialog-close-button').all()) {
    await close.click({ timeout: 1000 }).catch(() => {});
  }
}

await clearOverlays();
// Focus mode hides the menu bar, side bar and bottom panel so the canvas fills the page.
const focus = await page.evaluate(() => app.extensionManager.command.execute('Workspace.ToggleFocusMode')
  .then(() => true, () => false));
if (!focus) console.log('focus mode unavailable: menus stay in the picture');

let failures = 0;
for (const file of workflows) {
  const data = JSON.parse(fs.readFileSync(file, 'utf8'));
  const name = path.basename(file, '.json');
  const logStart = log.length;
  const report = await page.evaluate(async ({ data, name, margin, maxScale, fitClass }) => {
    await app.loadGraphData(structuredClone(data), true, false, name);
    // Fit every node (or those of one class; title bar included) into the canvas with a margin.
    const nodes = app.graph.nodes.filter((n) => !fitClass || n.comfyClass === fitClass);
    const minX = Math.min(...nodes.map((n) => n.pos[0]));
    const minY = Math.min(...nodes.map((n) => n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT));
    const maxX = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
    const maxY = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
    const { width, height } = app.canvas.canvas.getBoundingClientRect();
    const scale = Math.min((width - 2 * margin) / (maxX - minX), (height - 2 * margin) / (maxY - minY), maxScale);
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [(width / scale - (maxX - minX)) / 2 - minX, (height / scale - (maxY - minY)) / 2 - minY];
    app.graph.setDirtyCanvas(true, true);
    // What serialize() (the Save menu) writes, against the file, node by node.
    const saved = app.graph.serialize();
    const byId = new Map(data.nodes.map((n) => [n.id, n]));
    const values = (v) => JSON.stringify(v === undefined || (Array.isArray(v) && v.length === 0) ? null : v);
    const changed = saved.nodes.filter((n) => values(n.widgets_values) !== values(byId.get(n.id)?.widgets_values))
      .map((n) => ({ id: n.id, type: n.type, file: byId.get(n.id)?.widgets_values, saved: n.widgets_values }));
    return { scale, changed };
  }, { data, name, margin, maxScale, fitClass });
  // Give the Story Prompt preview its debounce and round trip, then read what it shows.
  await page.waitForTimeout(1500);
  await clearOverlays();
  await page.waitForTimeout(500);
  const previews = await page.evaluate(() => app.graph.nodes.filter((n) => n.comfyClass === 'StoryKitStoryPrompt')
    .map((n) => {
      const w = n.widgets?.find((x) => x.name === 'story_preview');
      const box = w?.element;  // Nodes 2.0 mounts this same element inside the node's Vue component
      const r = box?.getBoundingClientRect();
      const shown = !!box && box.isConnected && r.width > 0 && r.height > 0 && getComputedStyle(box).display !== 'none';
      return { id: n.id, widget: !!w, shown, text: box?.innerText ?? '' };
    }));
  const out = outFor(file);
  fs.mkdirSync(path.dirname(out), { recursive: true });
  const jpeg = /\.jpe?g$/i.test(out);
  await page.screenshot({ path: out, type: jpeg ? 'jpeg' : 'png', ...(jpeg ? { quality } : {}) });
  console.log(`${path.relative(process.cwd(), out)}: ${fs.statSync(out).size} bytes, scale ${report.scale.toFixed(3)}`);
  for (const p of previews) {
    console.log(`  Story Prompt #${p.id} preview ${p.shown ? 'shown' : 'NOT shown'}:\n    ` +
      (p.text.trim() || '(empty)').split('\n').join('\n    '));
    const missing = expect.filter((word) => !p.text.includes(word));
    if (missing.length) console.log(`    missing from the preview: ${missing.join(', ')}`);
    if (!p.widget || !p.shown || !p.text.trim() || missing.length) failures++;
  }
  // Warnings the front end printed while it loaded this file (missing nodes, validation, conversion).
  const loadWarnings = log.slice(logStart).filter((l) => /^\[(warning|error)\]/.test(l) &&
    !l.includes('Failed to load resource') && !l.includes('Jobs API') && !l.includes('Failed to fetch queue') &&
    !l.includes('is deprecated'));
  for (const w of loadWarnings) console.log(`  while loading: ${w.split('\n')[0]}`);
  failures += loadWarnings.length;
  for (const c of report.changed) {
    console.log(`  serialize() changed widgets_values of #${c.id} ${c.type}: ${JSON.stringify(c.file)} -> ` +
      JSON.stringify(c.saved));
    failures++;
  }
}

const errors = log.filter((l) => (l.startsWith('[error]') && !l.includes('Failed to load resource')) ||
  l.startsWith('[pageerror]') || l.startsWith('[http'));
const logFile = path.join(process.env.LOG_DIR ?? '/tmp', 'frontend-screenshot-console.log');
fs.writeFileSync(logFile, log.join('\n') + '\n');
console.log(`${errors.length} console errors (full log in ${logFile})`);
for (const e of errors) console.log(`  ${e}`);
await browser.close();
process.exit(failures ? 1 : 0);
