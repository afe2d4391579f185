"""Write tests/data/flux2_tiny_tekken_ids.json: the token ids ComfyUI 0.3.75's own, unmodified FLUX.2 tokenizer
(comfy.text_encoders.flux.Flux2Tokenizer, tokenizer_data["tekken_model"] as a text-encoder file hands it over) gives
for the tiny tekken vocabulary of runner/ditmodels.py. The host's converter call needs transformers 4, so run it with
transformers 4 ahead of the host venv's transformers 5 (the venv itself stays as it is):
(TF4_DIR: any empty folder, e.g. TF4_DIR=$(mktemp -d))

    python -m pip install --no-deps --target "$TF4_DIR" transformers==4.57.3 tokenizers==0.22.1 huggingface-hub==0.36.0
    PYTHONPATH="$TF4_DIR" bash tools/storykit.sh python tools/flux2_tokenizer_reference.py

tests/test_dit_models.py checks the tiny FLUX.2 CLIP (transformers 5) against these ids.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "tests" / "data" / "flux2_tiny_tekken_ids.json"
TEXTS = ["", "a red fox in the snow", "HelloWorld 12345 it's (running:1.2) through snow!",
         "[Mia] a young woman with short red hair, round glasses\nwakes up # Monday.", "café naïve, 狐 🦊"]
PADDED = ("a fox", 80)  # tokenizer_options {"mistral3_24b_min_length": 80}, as Story Prompt pads a story's frames


def main() -> int:
    sys.path.insert(0, str(REPO.parent))
    import transformers

    from storykit.runner import ditmodels, host
    host.boot(cpu=True)
    import comfy.text_encoders.flux as flux
    tokenizer = flux.Flux2Tokenizer(tokenizer_data=ditmodels.tiny_tekken_tokenizer_data())

    def ids(text, **kwargs):
        return [t[0] for t in tokenizer.tokenize_with_weights(text, **kwargs)["mistral3_24b"][0]]
    text, length = PADDED
    doc = {"made_with": f"ComfyUI 0.3.75 comfy.text_encoders.flux.Flux2Tokenizer, transformers "
                        f"{transformers.__version__}",
           "tekken_sha256": hashlib.sha256(ditmodels.tiny_tekken_json()).hexdigest(),
           "ids": {t: ids(t) for t in TEXTS},
           "padded": {"text": text, "min_length": length,
                      "ids": ids(text, tokenizer_options={"mistral3_24b_min_length": length})}}
    ids_lines = ",\n".join(f"  {json.dumps(t, ensure_ascii=False)}: {json.dumps(v)}" for t, v in doc.pop("ids").items())
    head = ",\n".join(f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in doc.items())
    TARGET.write_text("{\n" + head + ',\n "ids": {\n' + ids_lines + "\n }\n}\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
