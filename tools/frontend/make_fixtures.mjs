// Builds workflows in the REAL ComfyUI front end (headless Chromium) and saves, for each, what the front end itself
// produces: <name>.workflow.json (app.graph.serialize(): what the Save menu writes), <name>.export.json
// (graphToPrompt().workflow: what Export writes and what is embedded in saved PNGs) and <name>.api.json
// (graphToPrompt().output: the API prompt the front end queues). tests/test_frontend_conversion.py checks
// runner/convert.py against them. Not used by CI; see tools/frontend/README.md for how to run it.
//
//   node tools/frontend/make_fixtures.mjs [--url http://127.0.0.1:8199] [--out tests/data/frontend]
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';

const require = createRequire(process.env.PLAYWRIGHT_DIR ? path.join(process.env.PLAYWRIGHT_DIR, 'x.js') : import.meta.url);
const { chromium } = require('playwright-core');

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) =>
  (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []));
const url = args.url ?? 'http://127.0.0.1:8199';
const outDir = path.resolve(repo, args.out ?? 'tests/data/frontend');

// Graph builders, run inside the page. Each gets a fresh empty graph and the helpers `h`.
const BUILDERS = {
  // The front end's own default graph, exactly as "Load Default" gives it.
  default: async () => { await app.loadGraphData(); },

  primitive_reroute_bypass: async (h) => {
    const base = h.pipeline();
    const { ckpt, ks, dec, save, latent } = base;
    // Legacy Reroute node between the checkpoint's MODEL and the sampler.
    const reroute = h.add('Reroute', [330, 40]);
    h.link(ckpt, 'MODEL', reroute, 0);
    h.link(reroute, 0, ks, 'model');
    // A native (link midpoint) reroute on the VAE link, as Alt+click on a link makes.
    const vaeLink = app.graph.links.get(dec.inputs[dec.findInputSlot('vae')].link);
    app.graph.createReroute([700, 520], vaeLink);
    // PrimitiveNode drives the seed; its control is "increment".
    const prim = h.add('PrimitiveNode', [600, -160]);
    h.link(prim, 0, ks, 'seed');
    h.setWidget(prim, 'seed', 424242);
    h.setWidget(prim, 'control_after_generate', 'increment');
    // ImageInvert between decode and save, bypassed: IMAGE passes straight through.
    const invert = h.add('ImageInvert', [1450, 100]);
    h.link(dec, 'IMAGE', invert, 'image');
    h.link(invert, 'IMAGE', save, 'images');
    invert.mode = 4;
    // LatentUpscaleBy between the empty latent and the sampler, bypassed: LATENT passes through.
    const up = h.add('LatentUpscaleBy', [330, 620]);
    h.link(latent, 'LATENT', up, 'samples');
    h.link(up, 'LATENT', ks, 'latent_image');
    up.mode = 4;
    // A muted output node.
    const preview = h.add('PreviewImage', [1450, 420]);
    h.link(dec, 'IMAGE', preview, 'images');
    preview.mode = 2;
  },

  widget_as_input: async (h) => {
    const { ks, latent, pos } = h.pipeline();
    // Backend primitive nodes ("Int", "Float", "String (Multiline)") feeding widget inputs.
    const size = h.add('PrimitiveInt', [-300, 650]);
    h.setWidget(size, 'value', 640);
    h.setWidget(size, 'control_after_generate', 'fixed');
    h.link(size, 0, latent, 'width');
    h.link(size, 0, latent, 'height');
    const cfg = h.add('PrimitiveFloat', [600, -200]);
    h.setWidget(cfg, 'value', 6.5);
    h.link(cfg, 0, ks, 'cfg');
    const text = h.add('PrimitiveStringMultiline', [-300, 200]);
    h.setWidget(text, 'value', 'a lighthouse on a cliff at dusk, oil painting');
    h.link(text, 0, pos, 'text');
    // A legacy PrimitiveNode on a combo widget (sampler_name).
    const sampler = h.add('PrimitiveNode', [600, -60]);
    h.link(sampler, 0, ks, 'sampler_name');
    h.setWidget(sampler, 'sampler_name', 'dpmpp_2m');
    h.setWidget(ks, 'steps', 24);
  },

  notes: async (h) => {
    const { ckpt, ks } = h.pipeline();
    ks.title = 'Sampler (main)';
    const note = h.add('Note', [-400, -200]);
    h.setWidget(note, note.widgets[0].name, 'Plain note: load an SD1.5 checkpoint here.');
    const md = h.add('MarkdownNote', [100, -250]);
    h.setWidget(md, md.widgets[0].name, '# Markdown note\n\n* steps: 20\n* cfg: 8');
    const group = new LiteGraph.LGraphGroup('Model');
    group.pos = [ckpt.pos[0] - 20, ckpt.pos[1] - 60];
    group.size = [ckpt.size[0] + 40, ckpt.size[1] + 90];
    app.graph.add(group);
  },

  dynamic_prompt: async (h) => {
    const { pos, neg } = h.pipeline();
    // Only single-option choices so the front end's random pick is deterministic.
    h.setWidget(pos, 'text', 'a {red|red} fox, \\{not a choice\\}, \\(literal parens\\), (detailed:1.2) ' +
      '/* block comment */ in snow // line comment\nsecond line {{misty|misty} morning|{misty|misty} morning}');
    h.setWidget(neg, 'text', 'blurry, lowres');
  },

  // The everyday bypass: a LoraLoader (MODEL + CLIP) and a LoraLoaderModelOnly after it, both switched off.
  bypass_lora: async (h) => {
    const { ckpt, ks, pos, neg } = h.pipeline();
    const lora = h.add('LoraLoader', [330, -250]);
    h.setWidget(lora, 'lora_name', 'watercolor_style_sd15.safetensors');
    h.link(ckpt, 'MODEL', lora, 'model');
    h.link(ckpt, 'CLIP', lora, 'clip');
    const lora2 = h.add('LoraLoaderModelOnly', [650, -250]);
    h.setWidget(lora2, 'lora_name', 'watercolor_style_sd15.safetensors');
    h.link(lora, 'MODEL', lora2, 'model');
    h.link(lora2, 'MODEL', ks, 'model');
    h.link(lora, 'CLIP', pos, 'clip');
    h.link(lora, 'CLIP', neg, 'clip');
    lora.mode = 4;
    lora2.mode = 4;
  },

  // The two text encoders packed into a subgraph (right-click > Convert to Subgraph).
  subgraph: async (h) => {
    const { pos, neg } = h.pipeline();
    const made = app.graph.convertToSubgraph(new Set([pos, neg]));
    made.node.pos = [400, 150];
  },

  // Subgraph in a subgraph: sampler + decode packed, then packed again with the save node; the seed comes from an
  // Int node outside both, through two subgraph inputs; a bypassed ImageInvert sits inside the inner subgraph.
  subgraph_nested: async (h) => {
    const { ks, dec, save } = h.pipeline();
    const seed = h.add('PrimitiveInt', [500, -200]);
    h.setWidget(seed, 'value', 777);
    h.setWidget(seed, 'control_after_generate', 'fixed');
    h.link(seed, 0, ks, 'seed');
    const invert = h.add('ImageInvert', [1300, 400]);
    h.link(dec, 'IMAGE', invert, 'image');
    h.link(invert, 'IMAGE', save, 'images');
    invert.mode = 4;
    const inner = app.graph.convertToSubgraph(new Set([ks, dec, invert]));
    const outer = app.graph.convertToSubgraph(new Set([inner.node, save]));
    outer.node.pos = [850, 150];
  },

  // Sampler and both text encoders packed into a subgraph whose node shows their widgets (promoted widgets: front
  // end 1.5x promotes seed and the prompts itself on conversion and saves them as subgraph inputs wired to the
  // inner widgets); the values are then set on the subgraph node, as a user edits them there.
  subgraph_promoted: async (h) => {
    const { pos, neg, ks } = h.pipeline();
    const made = app.graph.convertToSubgraph(new Set([pos, neg, ks]));
    const node = made.node;
    node.pos = [500, 150];
    const promoted = node.widgets ?? [];
    if (!promoted.length) throw new Error('this front end promoted no widget on conversion');
    const seed = promoted.find((w) => w.name === 'seed');
    if (seed) { seed.value = 4321; seed.callback?.(4321, app.canvas, node, [0, 0], {}); }
    promoted.filter((w) => w.name.startsWith('text')).forEach((w, i) => {
      const text = i === 0 ? 'a paper boat on a puddle, promoted widget' : 'blurry, promoted negative';
      w.value = text;
      w.callback?.(text, app.canvas, node, [0, 0], {});
    });
  },

  // The pack's own story workflow as the template browser opens it (Story Prompt with its live preview, the
  // Consistent Self-Attention sampler, captions and the comic page), saved back by this front end.
  story_prompt: async () => {
    const res = await fetch('/api/workflow_templates/storykit/storykit_csa_sd15.json');
    if (!res.ok) throw new Error(`template not served: ${res.status}`);
    await app.loadGraphData(await res.json());
  },

  // The identity-routing workflows as the template browser opens them: Identity Routing, Routing Overlay fed by the
  // Story Sampler's second output; LoadImage (the example photo in the input folder) -> Character Photo.
  two_characters: async () => {
    const res = await fetch('/api/workflow_templates/storykit/storykit_two_characters.json');
    if (!res.ok) throw new Error(`template not served: ${res.status}`);
    await app.loadGraphData(await res.json());
  },
  photo_reference: async () => {
    const res = await fetch('/api/workflow_templates/storykit/storykit_photo_reference.json');
    if (!res.ok) throw new Error(`template not served: ${res.status}`);
    await app.loadGraphData(await res.json());
  },

  // What a user gets by bypassing or unplugging the node that drives a widget: the widget's own value is used.
  bypass_fallback: async (h) => {
    const { latent } = h.pipeline();
    h.setWidget(latent, 'width', 576);
    h.setWidget(latent, 'height', 448);
    const width = h.add('PrimitiveInt', [-300, 650]);
    h.setWidget(width, 'value', 1024);
    h.setWidget(width, 'control_after_generate', 'fixed');
    h.link(width, 0, latent, 'width');
    width.mode = 4;
    const reroute = h.add('Reroute', [-100, 800]);
    h.link(reroute, 0, latent, 'height');
  },
};

// Runs in the page: helpers to build graphs the way a user's clicks do.
function pageHelpers() {
  const add = (type, pos) => {
    const node = LiteGraph.createNode(type);
    if (!node) throw new Error(`no node type ${type}`);
    node.pos = pos;
    app.graph.add(node);
    return node;
  };
  const slot = (node, ref, kind) => {
    if (typeof ref === 'number') return ref;
    const i = kind === 'out' ? node.findOutputSlot(ref) : node.findInputSlot(ref);
    if (i < 0) throw new Error(`${node.type} has no ${kind} slot ${ref}`);
    return i;
  };
  const link = (a, out, b, inp) => {
    const made = a.connect(slot(a, out, 'out'), b, slot(b, inp, 'in'));
    if (!made) throw new Error(`could not link ${a.type}.${out} -> ${b.type}.${inp}`);
    return made;
  };
  const setWidget = (node, name, value) => {
    const w = node.widgets?.find((x) => x.name === name);
    if (!w) throw new Error(`${node.type} has no widget ${name}: ${node.widgets?.map((x) => x.name)}`);
    w.value = value;
    w.callback?.(w.value, app.canvas, node, [0, 0], {});
  };
  // checkpoint -> 2 x CLIPTextEncode -> KSampler -> VAEDecode -> SaveImage, built node by node.
  const pipeline = () => {
    const ckpt = add('CheckpointLoaderSimple', [0, 200]);
    setWidget(ckpt, 'ckpt_name', 'v1-5-pruned-emaonly-fp16.safetensors');
    const pos = add('CLIPTextEncode', [400, 100]);
    setWidget(pos, 'text', 'a watercolor fox in a snowy forest');
    const neg = add('CLIPTextEncode', [400, 350]);
    setWidget(neg, 'text', 'blurry, lowres');
    const latent = add('EmptyLatentImage', [0, 500]);
    const ks = add('KSampler', [850, 150]);
    setWidget(ks, 'seed', 1234);
    setWidget(ks, 'control_after_generate', 'fixed');
    const dec = add('VAEDecode', [1200, 150]);
    const save = add('SaveImage', [1450, 250]);
    link(ckpt, 'MODEL', ks, 'model');
    link(ckpt, 'CLIP', pos, 'clip');
    link(ckpt, 'CLIP', neg, 'clip');
    link(pos, 'CONDITIONING', ks, 'positive');
    link(neg, 'CONDITIONING', ks, 'negative');
    link(latent, 'LATENT', ks, 'latent_image');
    link(ks, 'LATENT', dec, 'samples');
    link(ckpt, 'VAE', dec, 'vae');
    link(dec, 'IMAGE', save, 'images');
    // The builders above relink model and latent_image through other nodes; connect() replaces the old link.
    return { ckpt, pos, neg, latent, ks, dec, save };
  };
  return { add, link, setWidget, pipeline };
}

const EMPTY = { last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [], config: {}, extra: {}, version: 0.4 };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync'],
});
const page = await browser.newPage({ viewport: { width: 1600, height: 900 } });
const log = [];
page.on('console', (m) => log.push(`[${m.type()}] ${m.text()}`));
page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
await page.goto(url, { waitUntil: 'load' });
await page.waitForFunction(() => window.app?.graph && window.LiteGraph && window.app.vueAppReady !== false, null,
  { timeout: 120000 });
await page.waitForTimeout(2000);
await page.keyboard.press('Escape'); // the template browser opens on a first visit
const version = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__);
console.log(`front end ${version}`);

fs.mkdirSync(outDir, { recursive: true });
const only = args.only !== undefined ? args.only.split(',').filter((n) => n in BUILDERS) : Object.keys(BUILDERS);
for (const name of only) {
  const result = await page.evaluate(async ({ source, helpers, empty }) => {
    await app.loadGraphData(structuredClone(empty));
    const h = (0, eval)(`(${helpers})`)();
    await (0, eval)(`(${source})`)(h);
    app.graph.setDirtyCanvas(true, true);
    const workflow = JSON.parse(JSON.stringify(app.graph.serialize()));
    const prompt = await app.graphToPrompt();
    return { workflow, exported: JSON.parse(JSON.stringify(prompt.workflow)), api: JSON.parse(JSON.stringify(prompt.output)) };
  }, { source: BUILDERS[name].toString(), helpers: pageHelpers.toString(), empty: EMPTY });
  for (const [suffix, data] of [['workflow', result.workflow], ['export', result.exported], ['api', result.api]]) {
    fs.writeFileSync(path.join(outDir, `${name}.${suffix}.json`), JSON.stringify(data, null, 2) + '\n');
  }
  console.log(`${name}: ${result.workflow.nodes.length} nodes, ${Object.keys(result.api).length} in the prompt`);
}


const errors = log.filter((l) => l.startsWith('[error]') || l.startsWith('[pageerror]'));
fs.writeFileSync(path.join(process.env.LOG_DIR ?? '/tmp', 'frontend-console.log'), log.join('\n') + '\n');
console.log(`${errors.length} console errors (full log in ${process.env.LOG_DIR ?? '/tmp'}/frontend-console.log)`);
await browser.close();
