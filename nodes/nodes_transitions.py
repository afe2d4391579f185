"""Transitions between story frames: StoryDiffusion's Semantic Motion Predictor on the host's Wan 2.1 and SVD models.

A semantic trajectory (CLIP-vision embeddings per video frame, between two story frames) conditions each latent frame
of the video model on its own image tokens: on Wan 2.1 through a diffusion-model wrapper and an attention override
that splits the image branch of cross-attention per latent frame; on SVD as one image embedding per frame.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field

import torch
from .v3 import io

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths

from ..kernels import safefiles
from ..kernels import semantic_motion as smp
from . import training

log = logging.getLogger("storykit")

PREDICTOR_FOLDER = "storykit_predictors"
CATEGORY = "StoryKit/transitions"
WRAPPER_KEY = "storykit_semantic_motion"
SUPPORTED = ("Wan 2.1 image-to-video and first/last-frame (WanImageToVideo, WanFirstLastFrameToVideo) and "
             "Stable Video Diffusion img2vid (ImageOnlyCheckpointLoader + SVD)")
EMBEDDING_OF_LAYOUT = {"wan21": "penultimate_hidden_states", "svd": "image_embeds"}


def _register_folder() -> None:
    """The predictors' model folder: models/storykit_predictors (and models/storykit, which the runner knows)."""
    # The runner may have added its --models folder already (with no extension filter): keep it, add the default.
    paths, exts = folder_paths.folder_names_and_paths.get(PREDICTOR_FOLDER, ([], set()))
    default = os.path.join(folder_paths.models_dir, PREDICTOR_FOLDER)
    folder_paths.folder_names_and_paths[PREDICTOR_FOLDER] = (
        paths + ([default] if default not in paths else []), set(exts) | {".safetensors"})
    for path in folder_paths.folder_names_and_paths.get("storykit", ([], set()))[0]:
        folder_paths.add_model_folder_path(PREDICTOR_FOLDER, os.path.join(path, "predictors"))


_register_folder()


# ---------------------------------------------------------------------------------------------- io types
@dataclass
class SemanticTrajectory:
    """Per-latent-frame CLIP-vision embeddings for each transition of a story, with their frame times and layout."""
    transitions: list[torch.Tensor]       # one [F, N, D] per pair of consecutive frames
    times: torch.Tensor                   # [F] time of each latent frame in [0, 1]
    spans: list[tuple[int, int]]          # pixel frames (first, last) each latent frame covers
    length: int                           # pixel frames of one transition
    layout: str                           # key of smp.LAYOUTS
    embedding: str                        # "penultimate_hidden_states" (Wan) or "image_embeds" (SVD)
    method: str = "linear"

    @property
    def frames(self) -> int:
        return len(self.spans)

    def transition(self, index: int, node: str) -> torch.Tensor:
        if not 0 <= index < len(self.transitions):
            raise ValueError(f"{node}: transition {index} does not exist; the trajectory has "
                             f"{len(self.transitions)} (0..{len(self.transitions) - 1}), one per pair of frames")
        return self.transitions[index]


@dataclass
class MotionPredictor:
    """A Semantic Motion Predictor with its training record (steps done, loss history, optimizer moments)."""
    model: smp.SemanticMotionPredictor
    step: int = 0
    losses: list[float] = field(default_factory=list)
    name: str = "predictor"
    optimizer: dict | None = None   # AdamW's state_dict() after `step` steps: a resumed run continues exactly


Trajectory = io.Custom("STORYKIT_TRAJECTORY")
Predictor = io.Custom("STORYKIT_MOTION_PREDICTOR")


# ---------------------------------------------------------------------------------------------- encoding
def encode_frames(clip_vision, images: torch.Tensor, embedding: str, chunk: int = 16) -> torch.Tensor:
    """IMAGE [n, H, W, C] -> [n, N, D]: ViT penultimate tokens (what Wan's clip_fea takes) or image_embeds [n, 1, D]."""
    out = []
    for start in range(0, images.shape[0], chunk):
        enc = clip_vision.encode_image(images[start:start + chunk])
        emb = enc["penultimate_hidden_states"] if embedding == "penultimate_hidden_states" else \
            enc["image_embeds"].unsqueeze(1)
        out.append(emb.float().cpu())
    return torch.cat(out)


def build_trajectory(clip_vision, images, length, layout, interpolation, predictor: MotionPredictor | None,
                     node: str = "StoryKitSemanticTrajectory") -> SemanticTrajectory:
    if images.shape[0] < 2:
        raise ValueError(f"{node}: images has {images.shape[0]} frame; give at least 2 (the start and end frame, "
                         "or a whole story's frames in order)")
    lay = smp.LAYOUTS[layout]
    if (length - 1) % lay.temporal_compression:
        raise ValueError(f"{node}: length {length} does not fit {layout}'s {lay.temporal_compression}x temporal "
                         f"compression; use 4k+1 frames (e.g. 81, 49, 33)")
    embedding = EMBEDDING_OF_LAYOUT[layout]
    enc = encode_frames(clip_vision, images, embedding)
    times = lay.frame_times(length)
    net = None
    if predictor is not None:
        net = predictor.model
        cfg = net.config
        if (cfg.tokens, cfg.embed_dim) != tuple(enc.shape[1:]):
            raise ValueError(f"{node}: the predictor was trained on {cfg.tokens} x {cfg.embed_dim} "
                             f"{cfg.embedding} but this CLIP vision model and layout give {enc.shape[1]} x "
                             f"{enc.shape[2]} {embedding}: use a predictor trained with the same CLIP vision model "
                             "and layout, or disconnect it")
    if net is not None:
        net.to(comfy.model_management.get_torch_device())
    try:
        with torch.no_grad():
            transitions = [smp.predict_trajectory(net, enc[i], enc[i + 1], times, interpolation).cpu()
                           for i in range(enc.shape[0] - 1)]
    finally:
        if net is not None:
            net.to(comfy.model_management.unet_offload_device())
    method = interpolation + (" + predictor" if net is not None else "")
    return SemanticTrajectory(transitions, times, lay.pixel_spans(length), length, layout, embedding, method)


# ---------------------------------------------------------------------------------------------- Wan 2.1 patch
class WanSemanticMotion:
    """Per-run state of one patched Wan model: its trajectory and the FLF checkpoint's image position embedding.

    DIFFUSION_MODEL wrapper: replaces clip_fea with the trajectory's tokens, frame after frame ([B, T*N, 1280]),
    and installs an attention override that runs the image branch of each cross-attention per latent frame
    (queries of frame f against frame f's N image tokens). Everything else goes to the previous override or the
    host's attention unchanged.
    """

    def __init__(self, tokens: torch.Tensor, emb_pos: torch.Tensor | None):
        self.tokens = tokens            # [F, N, 1280], kept on the CPU
        self.emb_pos = emb_pos          # FLF checkpoint: [1, 514, 1280], added per frame instead of once
        self.run_cache: dict = {}       # this run's clip_fea on the model's device, by (frames, device, dtype)

    def cleanup(self, *args, **kwargs):
        self.run_cache.clear()

    def frame_tokens(self, frames: int, device, dtype) -> torch.Tensor:
        """[frames * N, 1280]: latent frame f's tokens (frames appended in time reuse the last ones)."""
        key = (frames, str(device), dtype)
        if key not in self.run_cache:
            count, tokens = self.tokens.shape[:2]
            per_frame = self.tokens[torch.arange(frames).clamp(max=count - 1)].to(device, dtype)
            if self.emb_pos is not None:
                per_frame = per_frame + comfy.model_management.cast_to(self.emb_pos[:, :tokens], dtype=dtype,
                                                                       device=device)
            self.run_cache[key] = per_frame.reshape(-1, per_frame.shape[-1])
        return self.run_cache[key]

    def diffusion_model(self, executor, x, timestep, context, clip_fea=None, time_dim_concat=None,
                        transformer_options={}, *args, **kwargs):  # noqa: B006 - host signature
        model = executor.class_obj
        frames, tokens = self.tokens.shape[0], self.tokens.shape[1]
        b, _, t, h, w = x.shape
        if t != frames:
            raise ValueError(f"StoryKitWanSemanticMotion: the trajectory was made for {frames} latent frames "
                             f"({(frames - 1) * 4 + 1} video frames) but the video has {t} latent frames "
                             f"({(t - 1) * 4 + 1} frames): set the trajectory's length to the video's length")
        extra = 0 if time_dim_concat is None else time_dim_concat.shape[2]
        ph, pw = model.patch_size[1], model.patch_size[2]
        hw = ((h + ph - 1) // ph) * ((w + pw - 1) // pw)
        prefix = hw if (getattr(model, "ref_conv", None) is not None and "reference_latent" in kwargs) else 0
        dtype = clip_fea.dtype if clip_fea is not None else x.dtype
        fea = self.frame_tokens(t + extra, x.device, dtype).unsqueeze(0).expand(b, -1, -1)
        options = dict(transformer_options)
        layout = (t + extra, tokens, hw, prefix)
        options["optimized_attention_override"] = functools.partial(
            self.attention, layout, transformer_options.get("optimized_attention_override"))
        return executor(x, timestep, context, fea, time_dim_concat, options, *args, **kwargs)

    @staticmethod
    def attention(layout, previous, func, *args, **kwargs):
        """The image branch (keys = frames x N image tokens) per latent frame; any other attention unchanged."""
        def run(*a, **kw):
            return previous(func, *a, **kw) if previous is not None else func(*a, **kw)

        frames, tokens, hw, prefix = layout
        q, k, v = args[:3]
        if k.shape[1] != frames * tokens or q.shape[1] != prefix + frames * hw or k.shape[1] == q.shape[1] \
                or kwargs.get("mask") is not None or kwargs.get("skip_reshape"):
            return run(*args, **kwargs)
        b = q.shape[0]
        main = q[:, prefix:].reshape(b * frames, hw, q.shape[-1])
        out = run(main, k.reshape(b * frames, tokens, k.shape[-1]), v.reshape(b * frames, tokens, v.shape[-1]),
                  *args[3:], **kwargs).reshape(b, frames * hw, -1)
        if prefix:  # reference-image tokens see the first frame's image tokens
            head = run(q[:, :prefix], k[:, :tokens], v[:, :tokens], *args[3:], **kwargs)
            out = torch.cat([head, out], dim=1)
        return out


def is_wan_i2v(model) -> bool:
    import comfy.model_base
    base = model.model
    return isinstance(base, comfy.model_base.WAN21) and getattr(base.diffusion_model, "img_emb", None) is not None \
        and not isinstance(base, getattr(comfy.model_base, "WAN21_Vace", ()))


def is_svd(model) -> bool:
    import comfy.model_base
    return isinstance(model.model, comfy.model_base.SVD_img2vid)


def unsupported(node: str, model) -> ValueError:
    return ValueError(f"{node}: {type(model.model).__name__} is not supported; supported models: {SUPPORTED}. "
                      "Wan 2.2 and text-to-video checkpoints have no image branch to condition.")


def patch_wan(model, tokens: torch.Tensor, node: str = "StoryKitWanSemanticMotion"):
    """Clone `model` and condition each latent frame on its own image tokens ([F, N, 1280])."""
    if not is_wan_i2v(model):
        raise unsupported(node, model)
    if tokens.shape[-1] != 1280:
        raise ValueError(f"{node}: the trajectory holds {tokens.shape[-1]}-wide embeddings; Wan 2.1 takes "
                         "CLIP-vision ViT-H penultimate tokens (1280 wide): make the trajectory with layout "
                         "wan21 and the clip_vision_h model")
    m = model.clone()
    # through the patcher: a model left loaded by an earlier run may still carry our object patch (None)
    emb_pos = m.get_model_object("diffusion_model.img_emb.emb_pos")
    if emb_pos is not None:
        if tokens.shape[1] > emb_pos.shape[1]:
            raise ValueError(f"{node}: {tokens.shape[1]} image tokens per frame exceed this first/last-frame "
                             f"model's {emb_pos.shape[1]}")
        # the FLF checkpoint keeps only the first 514 image tokens; the wrapper adds the position embedding per
        # frame, so the projection itself must see no position embedding (and no truncation)
        m.add_object_patch("diffusion_model.img_emb.emb_pos", None)
    state = WanSemanticMotion(tokens.float(), emb_pos)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, state.diffusion_model)
    m.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLEANUP, WRAPPER_KEY, state.cleanup)
    return m


# ---------------------------------------------------------------------------------------------- SVD conditioning
def svd_conditioning(vae, start_image, embeds: torch.Tensor, width, height, motion_bucket_id, fps,
                     augmentation_level):
    """SVD_img2vid_Conditioning with one image embedding per video frame: embeds [L, 1, 1024] -> pooled rows."""
    pixels = comfy.utils.common_upscale(start_image[:1].movedim(-1, 1), width, height, "bilinear",
                                        "center").movedim(1, -1)[:, :, :, :3]
    if augmentation_level > 0:
        pixels = pixels + torch.randn_like(pixels) * augmentation_level
    concat = vae.encode(pixels)
    extra = {"motion_bucket_id": motion_bucket_id, "fps": fps, "augmentation_level": augmentation_level}
    positive = [[embeds, {**extra, "concat_latent_image": concat}]]
    negative = [[torch.zeros_like(embeds), {**extra, "concat_latent_image": torch.zeros_like(concat)}]]
    latent = torch.zeros([embeds.shape[0], 4, height // 8, width // 8])
    return positive, negative, {"samples": latent}


def wan_first_last(positive, negative, vae, width, height, length, start_image, end_image):
    """The concat latents and mask of WanFirstLastFrameToVideo (start and end frame pinned), batch 1."""
    import node_helpers
    scale = vae.spacial_compression_encode()
    frames = (length - 1) // 4 + 1
    latent = torch.zeros([1, vae.latent_channels, frames, height // scale, width // scale],
                         device=comfy.model_management.intermediate_device())
    start = comfy.utils.common_upscale(start_image[:1].movedim(-1, 1), width, height, "bilinear", "center")
    end = comfy.utils.common_upscale(end_image[:1].movedim(-1, 1), width, height, "bilinear", "center")
    image = torch.ones((length, height, width, 3)) * 0.5
    image[:1] = start.movedim(1, -1)[..., :3]
    image[-1:] = end.movedim(1, -1)[..., :3]
    mask = torch.ones((1, 1, frames * 4, latent.shape[-2], latent.shape[-1]))
    mask[:, :, :4] = 0.0
    mask[:, :, -1:] = 0.0
    concat = vae.encode(image)
    mask = mask.view(1, frames, 4, mask.shape[3], mask.shape[4]).transpose(1, 2)
    values = {"concat_latent_image": concat, "concat_mask": mask}
    return (node_helpers.conditioning_set_values(positive, values),
            node_helpers.conditioning_set_values(negative, values), {"samples": latent})


# ---------------------------------------------------------------------------------------------- nodes
def clip_vision_input():
    return io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the video model was trained with: "
                               "clip_vision_h (ViT-H) for Wan 2.1 and SVD.")


def layout_input():
    return io.Combo.Input("layout", options=list(smp.LAYOUTS), default="wan21",
                          tooltip="The video model: wan21 packs 4 frames per latent frame and uses the 257 ViT "
                                  "tokens; svd has one latent per frame and uses the pooled embedding.")


def interpolation_input():
    return io.Combo.Input("interpolation", options=list(smp.INTERPOLATIONS), default="linear",
                          tooltip="Path between the two frames' encodings: linear (the paper) or spherical (keeps "
                                  "the embeddings' norm, so middle frames do not fade). Train and use a predictor "
                                  "with the same one.")


class SemanticTrajectoryNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitSemanticTrajectory",
            display_name="Semantic Trajectory (StoryDiffusion)",
            category=CATEGORY,
            description="Encodes story frames with a CLIP vision model and gives every video frame of each "
                        "transition its own semantic embedding: interpolated (training-free) or predicted by a "
                        "Semantic Motion Predictor.",
            inputs=[
                clip_vision_input(),
                io.Image.Input("images", tooltip="Two frames (start, end) or a whole story in order: one "
                               "transition per pair of consecutive frames."),
                io.Int.Input("length", default=81, min=1, max=1025, step=1,
                             tooltip="Video frames per transition, as in the video node (Wan: 4k+1, 81 by "
                                     "default; SVD: video_frames, e.g. 14 or 25). More frames: a slower change."),
                layout_input(),
                interpolation_input(),
                Predictor.Input("predictor", optional=True,
                                tooltip="A trained Semantic Motion Predictor refines the path into motion it "
                                        "learned from clips; without one the interpolation is used as is."),
            ],
            outputs=[Trajectory.Output(display_name="trajectory")],
        )

    @classmethod
    def execute(cls, clip_vision, images, length, layout, interpolation, predictor=None) -> io.NodeOutput:
        return io.NodeOutput(build_trajectory(clip_vision, images, length, layout, interpolation, predictor))


class WanSemanticMotionNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitWanSemanticMotion",
            display_name="Wan Semantic Motion (per-frame image tokens)",
            category=CATEGORY,
            description="Makes each latent frame of a Wan 2.1 image-to-video or first/last-frame model attend to "
                        "its own semantic tokens from the trajectory instead of one image for the whole clip.",
            inputs=[
                io.Model.Input("model", tooltip="A Wan 2.1 i2v or FLF model (the one WanImageToVideo or "
                               "WanFirstLastFrameToVideo feeds)."),
                Trajectory.Input("trajectory", tooltip="From Semantic Trajectory with layout wan21 and the same "
                                 "length as the video node."),
                io.Int.Input("transition", default=0, min=0, max=4096,
                             tooltip="Which pair of story frames this video is between (0: frames 1 -> 2)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, trajectory, transition) -> io.NodeOutput:
        tokens = trajectory.transition(transition, "StoryKitWanSemanticMotion")
        return io.NodeOutput(patch_wan(model, tokens))


class SVDTransitionConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitSVDTransitionConditioning",
            display_name="SVD Transition Conditioning",
            category=CATEGORY,
            description="SVD_img2vid_Conditioning with one image embedding per video frame from the trajectory.",
            inputs=[
                Trajectory.Input("trajectory", tooltip="From Semantic Trajectory with layout svd; its length is "
                                 "the number of video frames."),
                io.Image.Input("init_image", tooltip="The transition's start frame (SVD pins the first frame)."),
                io.Vae.Input("vae", tooltip="SVD's VAE: encodes the start frame the video begins from."),
                io.Int.Input("width", default=1024, min=16, max=8192, step=8, tooltip="Video width (SVD: 1024)."),
                io.Int.Input("height", default=576, min=16, max=8192, step=8, tooltip="Video height (SVD: 576)."),
                io.Int.Input("transition", default=0, min=0, max=4096,
                             tooltip="Which pair of story frames (0: frames 1 -> 2)."),
                io.Int.Input("motion_bucket_id", default=127, min=1, max=1023,
                             tooltip="More motion with higher values (SVD default 127)."),
                io.Int.Input("fps", default=6, min=1, max=1024, tooltip="Frame rate the model is told (6)."),
                io.Float.Input("augmentation_level", default=0.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Noise on the start frame: more freedom from it (0)."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative"),
                     io.Latent.Output(display_name="latent")],
        )

    @classmethod
    def execute(cls, trajectory, init_image, vae, width, height, transition, motion_bucket_id, fps,
                augmentation_level) -> io.NodeOutput:
        node = "StoryKitSVDTransitionConditioning"
        if trajectory.embedding != "image_embeds":
            raise ValueError(f"{node}: the trajectory holds {trajectory.embedding}; SVD takes pooled image "
                             "embeddings: make it with layout svd")
        embeds = trajectory.transition(transition, node)  # [L, 1, 1024]
        return io.NodeOutput(*svd_conditioning(vae, init_image, embeds, width, height, motion_bucket_id, fps,
                                               augmentation_level))


class LoadMotionPredictor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitLoadMotionPredictor",
            display_name="Load Semantic Motion Predictor",
            category=CATEGORY,
            description="Loads a Semantic Motion Predictor (.safetensors with its config in the metadata) from "
                        "models/storykit_predictors.",
            inputs=[io.Combo.Input("predictor_name", options=folder_paths.get_filename_list(PREDICTOR_FOLDER),
                                   tooltip="A predictor saved by the StoryKit saver or trainer.")],
            outputs=[Predictor.Output(display_name="predictor")],
        )

    @classmethod
    def execute(cls, predictor_name) -> io.NodeOutput:
        path = folder_paths.get_full_path(PREDICTOR_FOLDER, predictor_name)
        if path is None:
            raise ValueError(f"StoryKitLoadMotionPredictor: {predictor_name} is not in models/{PREDICTOR_FOLDER}")
        try:
            net, meta = smp.load_predictor(path)
        except ValueError as exc:
            raise ValueError(f"StoryKitLoadMotionPredictor: predictor_name {predictor_name}: {exc}") from None
        sidecar = training.state_path(path)
        optimizer = None
        if sidecar.is_file():  # written by the trainer beside its checkpoints
            data = training.read_checkpoint(sidecar, "StoryKitLoadMotionPredictor", "the training state of")
            optimizer = {"state": training.optimizer_state(data)}
        return io.NodeOutput(MotionPredictor(net, int(meta.get("step", 0)), list(meta.get("losses", [])),
                                             os.path.splitext(os.path.basename(predictor_name))[0], optimizer))


class SaveMotionPredictor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitSaveMotionPredictor",
            display_name="Save Semantic Motion Predictor",
            category=CATEGORY,
            description="Saves a predictor to models/storykit_predictors under a new numbered name.",
            inputs=[Predictor.Input("predictor", tooltip="A trained (or loaded) predictor to keep."),
                    io.String.Input("filename_prefix", default="storykit_smp",
                                    tooltip="Files are named prefix_00001.safetensors, never overwriting one.")],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, predictor, filename_prefix) -> io.NodeOutput:
        path = save_record(predictor, predictor_dir(), filename_prefix)
        log.info("StoryKit: saved predictor %s", path)
        return io.NodeOutput(ui={"text": [os.path.basename(path)]})


def predictor_dir() -> str:
    return folder_paths.get_folder_paths(PREDICTOR_FOLDER)[0]


def save_record(predictor: MotionPredictor, folder: str, prefix: str, step: int | None = None) -> str:
    prefix = os.path.basename(prefix.strip()) or "storykit_smp"
    path = smp.save_predictor(predictor.model, safefiles.numbered_path(folder, prefix, step),
                              step=predictor.step, losses=predictor.losses[-2000:])
    if predictor.optimizer is not None:
        training.save_train_state(path, [predictor.optimizer], {}, predictor.step)
    return path


# ---------------------------------------------------------------------------------------------- story to video
class StoryToVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitStoryToVideo",
            display_name="Story To Video (transitions)",
            category=CATEGORY,
            description="Turns N story frames into one video of N-1 transitions: each pair's start and end frame "
                        "pinned (Wan; SVD pins the start), each latent frame conditioned on the trajectory.",
            inputs=[
                io.Model.Input("model", tooltip="Wan 2.1 i2v/FLF, or SVD img2vid."),
                io.Vae.Input("vae", tooltip="The video model's VAE (wan_2.1_vae for Wan 2.1): encodes the pinned "
                             "story frames and decodes the video."),
                Trajectory.Input("trajectory", tooltip="From Semantic Trajectory made of the same frames."),
                io.Image.Input("images", tooltip="The story frames, in order (the trajectory's frames)."),
                io.Int.Input("width", default=832, min=16, max=8192, step=16, tooltip="Video width."),
                io.Int.Input("height", default=480, min=16, max=8192, step=16, tooltip="Video height."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed of the first transition; transition i uses seed + i."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Sampling steps per transition."),
                io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Guidance (Wan 5.0; SVD about 2.5)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="Sampler, as in KSampler (Wan: uni_pc or euler; SVD: euler)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="Noise schedule, as in KSampler (Wan: simple; SVD: karras)."),
                io.Conditioning.Input("positive", optional=True, tooltip="Wan: the text prompt (CLIPTextEncode)."),
                io.Conditioning.Input("negative", optional=True, tooltip="Wan: the negative prompt."),
                io.Int.Input("motion_bucket_id", default=127, min=1, max=1023, optional=True,
                             tooltip="SVD only: more motion with higher values (127)."),
                io.Int.Input("fps", default=6, min=1, max=1024, optional=True, tooltip="SVD only (6)."),
            ],
            outputs=[io.Image.Output(display_name="video")],
        )

    @classmethod
    def execute(cls, model, vae, trajectory, images, width, height, seed, steps, cfg, sampler_name, scheduler,
                positive=None, negative=None, motion_bucket_id=127, fps=6) -> io.NodeOutput:
        node = "StoryKitStoryToVideo"
        pairs = len(trajectory.transitions)
        if images.shape[0] != pairs + 1:
            raise ValueError(f"{node}: images has {images.shape[0]} frames but the trajectory has {pairs} "
                             f"transitions: give the same frames as the Semantic Trajectory node ({pairs + 1})")
        wan = is_wan_i2v(model)
        if not wan and not is_svd(model):
            raise unsupported(node, model)
        if wan and (positive is None or negative is None):
            raise ValueError(f"{node}: Wan needs positive and negative text conditioning (CLIPTextEncode)")
        if (trajectory.layout == "wan21") != wan:
            raise ValueError(f"{node}: the trajectory was made with layout {trajectory.layout}, the model is "
                             f"{'Wan 2.1' if wan else 'SVD'}: set the Semantic Trajectory layout to "
                             f"{'wan21' if wan else 'svd'}")
        pbar = comfy.utils.ProgressBar(pairs * steps)
        clips = []
        for i in range(pairs):
            tokens = trajectory.transitions[i]
            if wan:
                m = patch_wan(model, tokens, node)
                pos, neg, latent = wan_first_last(positive, negative, vae, width, height, trajectory.length,
                                                  images[i:i + 1], images[i + 1:i + 2])
            else:
                m = model
                pos, neg, latent = svd_conditioning(vae, images[i:i + 1], tokens, width, height,
                                                    motion_bucket_id, fps, 0.0)
            frames = sample_clip(m, vae, latent, pos, neg, seed + i, steps, cfg, sampler_name, scheduler,
                                 lambda step, done=i * steps: pbar.update_absolute(done + step + 1, pairs * steps))
            clips.append(frames if i == 0 else frames[1:])  # the shared story frame once
        return io.NodeOutput(torch.cat(clips))


def sample_clip(model, vae, latent, positive, negative, seed, steps, cfg, sampler_name, scheduler, on_step):
    samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(samples, seed)
    out = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, samples,
                              callback=lambda step, x0, x, total: on_step(step), disable_pbar=True, seed=seed)
    images = vae.decode(out)
    if images.ndim == 5:
        images = images.reshape(-1, *images.shape[-3:])
    return images


# ---------------------------------------------------------------------------------------------- trainer
VIDEO_EXTS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _small_frame(image, short_side: int = 256) -> torch.Tensor:
    """A PIL image -> uint8 [H, W, 3] with its short side at most `short_side` (CLIP vision sees 224 px)."""
    import numpy as np
    from PIL import Image
    image = image.convert("RGB")
    scale = short_side / min(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())


def read_clip_folder(folder: str, node: str) -> list[torch.Tensor]:
    """A folder of clips: each video file, each subfolder of frames, and loose frames in the folder itself.

    Frames are kept small and as uint8, so an hour of footage does not need an hour of float pixels in memory.
    """
    from PIL import Image

    base = os.path.abspath(folder_paths.get_input_directory())
    asked, folder = folder, os.path.abspath(os.path.join(base, folder.strip()))
    if os.path.commonpath([base, folder]) != base or not os.path.isdir(folder):
        raise ValueError(f"{node}: folder {asked!r} is not a folder in ComfyUI's input folder ({base}): put the "
                         "videos or frame folders there and give the folder's name")

    def frames_of(paths):
        frames = []
        for p in paths:
            with Image.open(p) as img:
                frames.append(_small_frame(img))
        return frames

    clips = []
    entries = sorted(os.listdir(folder))
    groups = [[os.path.join(folder, e) for e in entries if e.lower().endswith(IMAGE_EXTS)]]
    for e in entries:
        path = os.path.join(folder, e)
        if os.path.isdir(path):
            groups.append([os.path.join(path, f) for f in sorted(os.listdir(path)) if f.lower().endswith(IMAGE_EXTS)])
        elif e.lower().endswith(VIDEO_EXTS):
            import av
            with av.open(path) as container:
                frames = [_small_frame(f.to_image()) for f in container.decode(video=0)]
            if len(frames) >= 2 and len({f.shape for f in frames}) == 1:
                clips.append(torch.stack(frames))
    for paths in groups:
        frames = frames_of(paths) if len(paths) >= 2 else []
        if frames and len({f.shape for f in frames}) == 1:
            clips.append(torch.stack(frames))
        elif frames:
            log.warning("StoryKit: skipped %s: its frames differ in size", os.path.dirname(paths[0]))
    if not clips:
        raise ValueError(f"{node}: no clips in {folder!r}: put video files ({', '.join(VIDEO_EXTS)}) or folders "
                         "of at least 2 frames there")
    return clips


class TrainMotionPredictor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="StoryKitTrainMotionPredictor",
            display_name="Train Semantic Motion Predictor",
            category=CATEGORY,
            description="Trains the predictor on your video clips in CLIP-embedding space: from a clip's first "
                        "and last frame it learns to predict the frames between. Checkpoints go to "
                        "models/storykit_predictors; Cancel keeps them.",
            inputs=[
                clip_vision_input(),
                io.Int.Input("steps", default=2000, min=1, max=1000000, tooltip="Optimizer steps (this run)."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate (the paper: 1e-4)."),
                io.Int.Input("batch_size", default=4, min=1, max=256, tooltip="Clips per step."),
                io.Int.Input("length", default=81, min=2, max=1025,
                             tooltip="Video frames of the transitions it will predict (as in Semantic "
                                     "Trajectory); clips are resampled to that many latent frames."),
                layout_input(),
                interpolation_input(),
                io.Int.Input("layers", default=8, min=1, max=64, tooltip="Transformer layers (paper: 8)."),
                io.Int.Input("hidden", default=1024, min=16, max=8192, step=16, tooltip="Width (paper: 1024)."),
                io.Int.Input("heads", default=16, min=1, max=64, tooltip="Attention heads; must divide hidden (16)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Initial weights and "
                             "clip order."),
                io.Int.Input("checkpoint_every", default=500, min=0, max=1000000,
                             tooltip="Save a numbered checkpoint every this many steps (0: only at the end)."),
                io.String.Input("name", default="storykit_smp", tooltip="Checkpoint names: name_<step>.safetensors."),
                io.Image.Input("clips", optional=True, tooltip="Frames of one or more clips (an IMAGE batch)."),
                io.Int.Input("clip_length", default=0, min=0, max=100000, optional=True,
                             tooltip="Split the clips batch into clips of this many frames (0: one clip)."),
                io.String.Input("folder", default="", optional=True,
                                tooltip="A folder in ComfyUI's input folder (its name, e.g. 'clips') holding videos or "
                                        "frame folders, one clip each."),
                Predictor.Input("predictor", optional=True,
                                tooltip="Resume: continue training this predictor (its step count goes on)."),
            ],
            outputs=[Predictor.Output(display_name="predictor"), io.Image.Output(display_name="loss_curve")],
        )

    @classmethod
    def execute(cls, clip_vision, steps, learning_rate, batch_size, length, layout, interpolation, layers,
                hidden, heads, seed, checkpoint_every, name, clips=None, clip_length=0, folder="",
                predictor=None) -> io.NodeOutput:
        node = "StoryKitTrainMotionPredictor"
        lay = smp.LAYOUTS[layout]
        frames = lay.latent_frames(length)
        if frames < 3:
            raise ValueError(f"{node}: length {length} gives {frames} latent frames; the predictor needs at least 3 "
                             "(a start, an end and one between)")
        raw = split_clips(clips, clip_length, node) + (read_clip_folder(folder, node) if folder.strip() else [])
        if not raw:
            raise ValueError(f"{node}: no training clips: connect clips (IMAGE) or set folder")
        embedding = EMBEDDING_OF_LAYOUT[layout]
        times, targets = encode_training_set(clip_vision, raw, frames, lay, embedding)
        with torch.inference_mode(False), torch.enable_grad():
            record = prepare_predictor(predictor, targets, embedding, layers, hidden, heads, seed, node)
            train(record, times.clone(), targets.clone(), steps, learning_rate, batch_size, seed, interpolation,
                  checkpoint_every, predictor_dir(), name)
        return io.NodeOutput(record, training.image_tensor(training.loss_curve({"loss": record.losses})))


def split_clips(images, clip_length: int, node: str) -> list[torch.Tensor]:
    if images is None:
        return []
    if clip_length <= 0:
        return [images]
    clips = [images[i:i + clip_length] for i in range(0, images.shape[0], clip_length)]
    clips = [c for c in clips if c.shape[0] >= 2]
    if not clips:
        raise ValueError(f"{node}: clip_length {clip_length} leaves no clip of at least 2 frames")
    return clips


def encode_training_set(clip_vision, clips, frames, layout, embedding):
    """Encode only the frames the objective uses: each clip at the layout's frame times -> ([C, L], [C, L, N, D])."""
    times, targets = [], []
    for clip in clips:
        index = torch.arange(clip.shape[0]).view(-1, 1, 1).float()
        t, picked = smp.clip_training_pair(index, frames, layout)
        times.append(t)
        picked_frames = clip[picked.flatten().long()]
        if picked_frames.dtype == torch.uint8:  # frames read from a folder
            picked_frames = picked_frames.float() / 255.0
        targets.append(encode_frames(clip_vision, picked_frames, embedding))
    return torch.stack(times), torch.stack(targets)


def prepare_predictor(predictor, targets, embedding, layers, hidden, heads, seed, node) -> MotionPredictor:
    tokens, dim = targets.shape[-2:]
    if predictor is not None:
        cfg = predictor.model.config
        if (cfg.tokens, cfg.embed_dim) != (tokens, dim):
            raise ValueError(f"{node}: the predictor to resume takes {cfg.tokens} x {cfg.embed_dim} embeddings, "
                             f"these clips give {tokens} x {dim}: use the same CLIP vision model and layout")
        net = smp.SemanticMotionPredictor(cfg)  # fresh parameters: the input predictor stays as it was
        net.load_state_dict({k: v.clone().float() for k, v in predictor.model.state_dict().items()})
        return MotionPredictor(net, predictor.step, list(predictor.losses), predictor.name, predictor.optimizer)
    net = smp.SemanticMotionPredictor(smp.PredictorConfig(
        embed_dim=dim, tokens=tokens, hidden=hidden, layers=layers, heads=heads, embedding=embedding))
    net.reset_parameters(seed)
    return MotionPredictor(net)


def train(record: MotionPredictor, times, targets, steps, lr, batch_size, seed, interpolation, checkpoint_every,
          folder, name) -> None:
    """The training loop: progress bar, Cancel each step (a checkpoint is written first), numbered checkpoints."""
    device = comfy.model_management.get_torch_device()
    net = record.model.to(device).train()
    for p in net.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    if record.optimizer is not None and record.optimizer["state"]:  # copies: the input record stays as it was
        state = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
                 for i, st in record.optimizer["state"].items()}
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    pbar = comfy.utils.ProgressBar(steps)
    try:
        for i in range(steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            gen = training.step_generator(seed, record.step)  # the same draws whether resumed or not
            pick = torch.randint(0, targets.shape[0], (min(batch_size, targets.shape[0]),), generator=gen)
            loss = smp.predictor_loss(net, times[pick].to(device), targets[pick].to(device), interpolation)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            record.step += 1
            record.optimizer = opt.state_dict()  # the live moments, saved with every checkpoint
            record.losses.append(float(loss.detach()))
            pbar.update_absolute(i + 1, steps)
            if checkpoint_every and record.step % checkpoint_every == 0:
                save_record(record, folder, name, record.step)
    except comfy.model_management.InterruptProcessingException:
        if record.losses:
            path = save_record(record, folder, name, record.step)
            log.warning("StoryKit: training cancelled at step %d; checkpoint %s", record.step, path,
                        extra={"storykit_saved": path, "storykit_resume": "load it with Load Semantic Motion "
                               "Predictor into this trainer's predictor input"})
        raise
    finally:
        net.eval().requires_grad_(False).to(comfy.model_management.unet_offload_device())
    if not checkpoint_every or record.step % checkpoint_every:
        save_record(record, folder, name, record.step)


NODES = [SemanticTrajectoryNode, WanSemanticMotionNode, SVDTransitionConditioning, StoryToVideo,
         LoadMotionPredictor, SaveMotionPredictor, TrainMotionPredictor]
