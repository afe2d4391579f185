// StoryKit: a live preview under the Story Prompt node's text box. As you type, the server parses the story with
// the node's own parser (POST /storykit/story/preview) and this shows the characters, each frame with who is in it,
// which frames are references, the captions, and any error with its line, before you queue anything. With several
// characters it shows each frame's places (Lena@left + Bob@right) and, per character, where its mask comes from:
// a Character Mask node fed by this story, a box from the story or an Identity Routing layout, or the model's own
// attention; Character Photo nodes are listed, and what those nodes would refuse is shown as an error.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE = "StoryKitStoryPrompt";
const STORY_TYPE = "STORYKIT_STORY";
const GRAPH_NODES = {  // node class -> [key in the route's graph, widgets it reads]
  StoryKitCharacterMask: ["masks", ["character", "frames"]],
  StoryKitCharacterPhoto: ["photos", ["character", "use"]],
  StoryKitIdentityRouting: ["routing", ["mode", "layout"]],
};
const MODE_MUTED = 2;
const MODE_BYPASS = 4;

function linkOf(graph, id) {
  if (id == null) return null;
  return graph.getLink?.(id) ?? graph.links?.get?.(id) ?? graph.links?.[id] ?? null;
}

// The nodes this Story Prompt's story output reaches, through every node that passes a story on (Identity
// Routing, Character Mask, Character Photo, reroutes), with the widgets the route needs.
function storyGraph(node) {
  const graph = node.graph;
  const out = { masks: [], photos: [], routing: [] };
  if (!graph) return out;
  const seen = new Set([node.id]);
  const queue = [node];
  while (queue.length) {
    const current = queue.shift();
    for (const output of current.outputs ?? []) {
      if (output.type !== STORY_TYPE && (current === node || output.type !== "*")) continue;  // "*": a reroute
      for (const id of output.links ?? []) {
        const link = linkOf(graph, id);
        const next = link && graph.getNodeById(link.target_id);
        if (!next || seen.has(next.id)) continue;
        seen.add(next.id);
        queue.push(next);
        const kind = GRAPH_NODES[next.comfyClass ?? next.type];
        if (!kind || next.mode === MODE_MUTED || next.mode === MODE_BYPASS) continue;
        const entry = { id: next.id };
        for (const name of kind[1]) entry[name] = next.widgets?.find((w) => w.name === name)?.value ?? "";
        out[kind[0]].push(entry);
      }
    }
  }
  return out;
}

function el(tag, style, text) {
  const e = document.createElement(tag);
  if (style) e.style.cssText = style;
  if (text !== undefined) e.textContent = text;
  return e;
}

function render(box, data) {
  box.replaceChildren();
  if (!data) return;
  if (!data.ok) {
    box.append(el("div", "color:#ff6b6b;white-space:pre-wrap", data.error));
    return;
  }
  const names = data.characters.map((c) => c.name).join(", ") || "none";
  const refs = data.frames.filter((f) => f.reference).length;
  box.append(el("div", "opacity:0.8;margin-bottom:2px",
    `${data.characters.length} character(s): ${names} · ${data.frames.length} frame(s), ${refs} reference(s)`));
  if (data.routing_mode === "off") box.append(el("div", "opacity:0.8", "identity routing: off (plain sharing)"));
  for (const p of data.photos || []) box.append(el("div", "opacity:0.8", `photo: ${p.character} (${p.use})`));
  data.frames.forEach((f, i) => {
    const places = f.place_names || {};
    const who = f.characters.length
      ? f.characters.map((c) => (places[c] ? `${c}@${places[c]}` : c)).join(" + ") : "no character";
    const mark = f.reference ? "★ " : "";
    const row = el("div", "white-space:nowrap;overflow:hidden;text-overflow:ellipsis",
      `${i + 1}. ${mark}${who}${f.caption ? " — " + f.caption : ""}`);
    row.title = `line ${f.line}${f.reference ? " (reference: written to the identity bank)" : ""}`;
    box.append(row);
    const sources = Object.entries(f.sources || {});
    if (sources.length) {
      const line = el("div", "opacity:0.7;padding-left:2em;white-space:nowrap;overflow:hidden;text-overflow:ellipsis",
        "mask: " + sources.map(([c, s]) => `${c} ${s}`).join(" · "));
      line.className = "storykit-sources";
      box.append(line);
    }
  });
  for (const note of data.notes || []) box.append(el("div", "color:#e0b050", note));
  for (const error of data.graph_errors || []) box.append(el("div", "color:#ff6b6b;white-space:pre-wrap", error));
}

app.registerExtension({
  name: "StoryKit.StoryPromptPreview",
  async nodeCreated(node) {
    if (node.comfyClass !== NODE) return;
    const widget = (name) => node.widgets?.find((w) => w.name === name);
    const story = widget("story");
    if (!story) return;
    const box = el("div",
      "font:11px monospace;color:var(--input-text,#ddd);background:var(--comfy-input-bg,#222);" +
      "border-radius:4px;padding:4px 6px;overflow-y:auto;max-height:160px;box-sizing:border-box");
    const preview = node.addDOMWidget("story_preview", "storykit_preview", box, { serialize: false, hideOnZoom: true });
    // options.serialize only keeps the widget out of the queued prompt; graph.serialize() (Save, Export) reads the
    // widget's own flag, and without it every save would append the preview's value to widgets_values.
    preview.serialize = false;

    let timer = null;
    let asked = 0;
    let seen = "";  // the story graph the preview shows; a change anywhere downstream asks again
    const update = () => {
      clearTimeout(timer);
      timer = setTimeout(async () => {
        const mine = ++asked;
        const graph = storyGraph(node);
        seen = JSON.stringify(graph);
        try {
          const res = await api.fetchApi("/storykit/story/preview", {
            method: "POST",
            headers: { "Content-Type": "application/json" },
            body: JSON.stringify({
              story: story.value ?? "",
              references_per_character: widget("references_per_character")?.value ?? 2,
              reference_mode: widget("reference_mode")?.value ?? "auto",
              graph,
            }),
          });
          if (mine === asked) render(box, await res.json());
        } catch (err) {
          if (mine === asked) render(box, { ok: false, error: `preview unavailable: ${err}` });
        }
      }, 300);
    };
    for (const name of ["story", "references_per_character", "reference_mode"]) {
      const w = widget(name);
      if (!w) continue;
      const callback = w.callback;
      w.callback = function () {
        const result = callback?.apply(this, arguments);
        update();
        return result;
      };
    }
    story.inputEl?.addEventListener("input", update);
    // Mask, photo and routing nodes live elsewhere in the graph: look every second whether what they say changed.
    const watch = setInterval(() => {
      if (node.graph && JSON.stringify(storyGraph(node)) !== seen) update();
    }, 1000);
    const removed = node.onRemoved;
    node.onRemoved = function () {
      clearInterval(watch);
      clearTimeout(timer);
      return removed?.apply(this, arguments);
    };
    update();
  },
});
