// StoryKit: a live preview under the Story Prompt node's text box. As you type, the server parses the story with
// the node's own parser (POST /storykit/story/preview) and this shows the characters, each frame with who is in it,
// which frames are references, the captions, and any error with its line, before you queue anything.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE = "StoryKitStoryPrompt";

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
  data.frames.forEach((f, i) => {
    const who = f.characters.length ? f.characters.join(" + ") : "no character";
    const mark = f.reference ? "★ " : "";
    const row = el("div", "white-space:nowrap;overflow:hidden;text-overflow:ellipsis",
      `${i + 1}. ${mark}${who}${f.caption ? " — " + f.caption : ""}`);
    row.title = `line ${f.line}${f.reference ? " (reference: written to the identity bank)" : ""}`;
    box.append(row);
  });
  for (const note of data.notes || []) box.append(el("div", "color:#e0b050", note));
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
    const update = () => {
      clearTimeout(timer);
      timer = setTimeout(async () => {
        const mine = ++asked;
        try {
          const res = await api.fetchApi("/storykit/story/preview", {
            method: "POST",
            headers: { "Content-Type": "application/json" },
            body: JSON.stringify({
              story: story.value ?? "",
              references_per_character: widget("references_per_character")?.value ?? 2,
              reference_mode: widget("reference_mode")?.value ?? "auto",
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
    update();
  },
});
