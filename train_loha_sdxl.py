#!/usr/bin/env python
"""Train a LoHa adapter for Stable Diffusion XL: one run, read top to bottom.

    python train_loha_sdxl.py --demo              # offline: tiny SDXL + examples/data, on a CPU
    accelerate launch train_loha_sdxl.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --train_data_dir my_photos --output_dir my_loha --mixed_precision fp16 ...

Flags follow diffusers' train_text_to_image_lora_sdxl.py wherever it has one. Outputs: output_dir/unet/
(PEFT LoHa folder), output_dir/<output_name>.safetensors (kohya/LyCORIS file for ComfyUI and
AUTOMATIC1111), training_args.json, README.md, samples/step-<N>.png, checkpoint-<N>/.

Determinism: every random draw of a training step (timestep, noise, latent sample, crop, flip, caption
pick and dropout, batch order) is a function of (--seed, epoch, sample index). A run resumed from a
checkpoint therefore continues bit for bit, and N processes see the same global batches as one. The
only global-RNG consumer left is LoHa rank/module dropout, whose RNG state accelerate checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import importlib.util
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import loha
import loha.memory
from loha import LoHaError
from loha import cli as loha_cli
from loha import data as loha_data
from loha import ema as loha_ema
from loha import fp8 as loha_fp8
from loha import hub as loha_hub
from loha import kohya_data as loha_kohya
from loha import losses as loha_losses
from loha import optimizers as loha_opt
from loha import plots as loha_plots
from loha import runs as loha_runs
from loha import sampling as loha_sampling
from loha import sources as loha_sources
from loha.kohya_data import Dataset, Subset

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
REPO = Path(__file__).resolve().parent
NONFINITE_STREAK_LIMIT = 5
STATE_FILE = "training_state.json"  # written last into every checkpoint: {"global_step": N, "factor_storage": ...}


def demo_defaults() -> dict:
    """The offline demo: a tiny SDXL-architecture pipeline built locally, trained on examples/data."""
    return dict(
        pretrained_model_name_or_path="loha-demo/tiny-sdxl", train_data_dir=str(REPO / "examples" / "data"),
        output_dir="loha-demo/output", resolution=64, enable_bucket=True, random_flip=True,
        train_batch_size=2, max_train_steps=300, learning_rate=3e-3, lr_warmup_steps=10,
        checkpointing_steps=100, checkpoints_total_limit=2, cache_latents=True,
        validation_prompt=["a close-up photo of the face of a tabby cat"], num_validation_images=2,
        validation_steps=100, num_validation_inference_steps=10, report_to="tensorboard", seed=0,
        feature_cache_dir="loha-demo/cache",
    )


# ============================================================================================ main
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.dry_run:
            return dry_run(args)
        with contextlib.ExitStack() as held:
            accelerator = start_accelerator(args, held)  # takes the output folder's lock: one run per folder
            resume = plan_resume(args, argv, accelerator)  # checked before anything loads or is written
            data = load_training_data(args, accelerator)  # bad data fails before minutes of model loading
            print_plan(data, args, accelerator)
            check_fit(data, args, accelerator)  # on a GPU: will it fit? before minutes of model loading
            models = load_models(args, accelerator)
            add_adapters(models, args)
            cache_features(data, models, args, accelerator)
            run = prepare_training(models, data, args, accelerator)
            resume_from_checkpoint(run, args, resume)
            start_logging(run, args)
            validate(run, args)  # before training: the baseline to compare against
            if args.sample_at_first and run.global_step == 0:
                sample_prompts(run, args)
            train(run, args)
            save_final_outputs(run, args)
            print_summary(run, args)
    except Interrupted as e:
        return fail(str(e), e.status)
    except loha_runs.StopNow as e:
        return fail(e.message, e.code)
    except LoHaError as e:
        return fail(str(e))
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
            raise  # anything else is a bug worth a traceback
        return fail(f"cannot write {e.filename or ''}: {e.strerror}".replace("write : ", "write: "))
    return 0


def fail(message: str, status: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


class Interrupted(Exception):
    """A SIGINT/SIGTERM stopped the run after saving a checkpoint; exits with the signal's status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


# ======================================================================================= arguments
def build_parser() -> argparse.ArgumentParser:
    p = loha_cli.parser(__doc__.split("\n\n")[0])
    on_off = dict(action=argparse.BooleanOptionalAction, default=False)  # --x / --no-x: demo defaults can be undone
    p.add_argument("--dry_run", action="store_true",
                   help="print the plan (data, buckets, steps) and the estimated peak GPU memory of this exact "
                        "configuration, then exit; reads no weights and writes nothing")
    g = p.add_argument_group("demo")
    g.add_argument("--demo", action="store_true",
                   help="offline demo: build a tiny SDXL pipeline locally and train on examples/data "
                        "(explicit flags override its defaults)")
    g.add_argument("--demo_model_dir", default="loha-demo/tiny-sdxl", help="folder where --demo builds its pipeline")

    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default=DEFAULT_MODEL,
                   help="the SDXL base model: a hub id, a local diffusers folder, or a single-file checkpoint "
                        "(.safetensors in the A1111/ComfyUI layout: Pony, Illustrious, NoobAI, ...)")
    g.add_argument("--config", default=None,
                   help="for a single-file base: the diffusers folder or hub id its configs, tokenizers and "
                        f"scheduler come from; default: {loha_sources.SDXL_BASE}'s, from the local cache")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="a VAE that is safe in 16 bits (hub id, folder or single .safetensors file), e.g. "
                        "madebyollin/sdxl-vae-fp16-fix; default: none (the model's own VAE, run in fp32)")
    g.add_argument("--base_precision", choices=["auto", "fp8"], default="auto",
                   help="storage of the frozen UNet's Linear and Conv2d weights: auto (the --mixed_precision "
                        "dtype) or fp8 (float8_e4m3fn, computed in the mixed-precision dtype: half the weights' "
                        "memory; kohya's --fp8_base). Default: auto")
    g.add_argument("--fp8_base", dest="base_precision", action="store_const", const="fp8",
                   help="kohya's name for --base_precision fp8")
    g.add_argument("--revision", default=None,
                   help="hub revision (branch, tag or commit) of the base model; default: main")
    g.add_argument("--variant", default=None,
                   help="weight file variant of the base model, e.g. fp16; default: none (the plain weights)")
    g.add_argument("--cache_dir", default=None, help="Hugging Face download cache folder; default: $HF_HOME/hub")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None,
                   help="a hub dataset id or a local datasets folder; default: none (give this or --train_data_dir)")
    g.add_argument("--dataset_config_name", default=None, help="the dataset's configuration name; default: none")
    g.add_argument("--train_data_dir", default=None,
                   help="an image folder: kohya's layout (N_name subfolders: N repeats per epoch, 'name' the caption "
                        "of images without a caption file; a subfolder without the N_ prefix and images beside the "
                        "subfolders are skipped, as kohya skips them), or plain (photo.png + photo.txt, or "
                        "metadata.jsonl); default: none (give this, --dataset_name or --dataset_config)")
    g.add_argument("--reg_data_dir", default=None,
                   help="regularization (prior-preservation) images in kohya's layout: each epoch draws as many of "
                        "them as training images, as kohya balances them; default: none")
    g.add_argument("--prior_loss_weight", type=float, default=1.0,
                   help="weight of the regularization images' loss (0 removes their influence); default: 1.0")
    g.add_argument("--dataset_config", default=None,
                   help="kohya's dataset-config TOML ([general], [[datasets]], [[datasets.subsets]]); its values win "
                        "over the same flags, which are the defaults of what it leaves unset; default: none")
    g.add_argument("--image_column", default="image", help="dataset column holding the images")
    g.add_argument("--caption_column", default="text", help="dataset column (or metadata key) holding the captions")
    g.add_argument("--caption_extension", default=".txt",
                   help="caption file suffix (kohya's default is .caption); default: .txt")
    g.add_argument("--shuffle_caption", **on_off,
                   help="shuffle the caption's tags (split by --caption_separator) on every draw; default: off")
    g.add_argument("--keep_tokens", type=int, default=0,
                   help="keep the first N tags in place when shuffling or dropping tags; default: 0")
    g.add_argument("--keep_tokens_separator", default=None,
                   help="instead of --keep_tokens: the tags before this marker (and after a second one) stay fixed; "
                        "default: none")
    g.add_argument("--caption_separator", default=",", help="the separator between tags; default: ,")
    g.add_argument("--caption_tag_dropout_rate", type=float, default=0.0,
                   help="drop each shufflable tag with this probability on every draw, in [0, 1); default: 0")
    g.add_argument("--caption_prefix", default=None, help="text put before every caption; default: none")
    g.add_argument("--caption_suffix", default=None, help="text put after every caption; default: none")
    g.add_argument("--caption_variants", type=int, default=8,
                   help="with cached text embeddings, captions that shuffle or drop tags use this many fixed "
                        "variants each, drawn per step (each is encoded once); without the cache every draw is "
                        "encoded on the fly; default: 8")
    g.add_argument("--masked_loss", **on_off,
                   help="weight the loss by a mask per image (white: learn, black: ignore), the masked mean in "
                        "latent space: from the image's alpha channel, or from --mask_data_dir; default: off")
    g.add_argument("--mask_data_dir", default=None,
                   help="masks with the images' file names (in the image's folder name below it, or at its top), "
                        "each of its image's size; default: none (the alpha channel)")
    g.add_argument("--validation_split", type=float, default=None,
                   help="hold out this fraction of the training images (a seeded choice, never regularization "
                        "images) for a validation loss; default: none")
    g.add_argument("--validation_data_dir", default=None,
                   help="instead of --validation_split: a folder of held-out images with captions (same layouts as "
                        "--train_data_dir); default: none")
    g.add_argument("--max_train_samples", type=int, default=None,
                   help="use at most this many samples (a seeded choice); default: all")
    g.add_argument("--resolution", type=int, default=1024,
                   help="training side length in pixels: a multiple of 8, or of 64 with --enable_bucket")
    g.add_argument("--center_crop", **on_off, help="crop the center instead of a random crop")
    g.add_argument("--random_flip", **on_off, help="flip each image horizontally with probability 0.5")
    g.add_argument("--enable_bucket", **on_off, help="aspect-ratio buckets (SDXL/kohya style) instead of square crops")
    g.add_argument("--min_bucket_reso", type=int, default=None,
                   help="smallest bucket side in pixels; default: a quarter of --resolution")
    g.add_argument("--max_bucket_reso", type=int, default=None,
                   help="largest bucket side in pixels; default: twice --resolution")
    g.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this; default: 64")
    g.add_argument("--caption_dropout", "--caption_dropout_rate", type=float, default=0.0,
                   help="probability of training on the empty prompt instead of the caption (for CFG), in [0, 1); "
                        "kohya's --caption_dropout_rate; default: 0")
    g.add_argument("--cache_latents", **on_off, help="encode every image once and keep the latents on disk")
    g.add_argument("--cache_text_embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="keep prompt embeddings on disk; default: on whenever the text encoders are frozen")
    g.add_argument("--feature_cache_dir", default=None,
                   help="folder for cached latents and embeddings, shared safely between runs; "
                        "default: $HF_HOME/loha-sdxl-features")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="data loader worker processes (0: in the main process)")

    g = p.add_argument_group("adapter")
    g.add_argument("--preset", default=None, choices=list(loha.PRESETS),
                   help="which modules get LoHa, with LyCORIS's preset names: attn-only (the UNet's attention "
                        "linears), attn-mlp, full (also the resnet convs, samplers, conv_in/out and "
                        "the embeddings), full-lin, unet-transformer-only, unet-convblock-only; default: attn-only")
    g.add_argument("--target_modules", default=None,
                   help="comma-separated module names instead of a preset (a path or its last parts, e.g. to_q,to_k); "
                        "default: none (the preset's)")
    g.add_argument("--rank", type=int, default=8, help="LoHa rank r of Linear and 1x1 conv layers (ΔW reaches rank r²)")
    g.add_argument("--alpha", type=float, default=None, help="scale is alpha/rank; default: alpha = rank (scale 1)")
    g.add_argument("--conv_rank", type=int, default=None,
                   help="rank of convs with a kernel larger than 1x1 (LyCORIS's conv_dim); default: --rank")
    g.add_argument("--conv_alpha", type=float, default=None, help="alpha of those convs; default: --alpha")
    g.add_argument("--use_tucker", **on_off,
                   help="Tucker (CP) factors for convs larger than 1x1, as LyCORIS's use_tucker")
    g.add_argument("--rank_dropout", type=float, default=0.0,
                   help="probability of dropping each output row of ΔW in training, in [0, 1)")
    g.add_argument("--module_dropout", type=float, default=0.0,
                   help="probability of skipping a whole adapter for a step in training, in [0, 1)")
    g.add_argument("--loha_forward_mode", choices=loha.FORWARD_MODES, default="grouped",
                   help="grouped: same-shape layers built and differentiated together, saving only their "
                        "inputs (fastest and leanest); merged: one Function per layer; bypass: base(x) + x·ΔWᵀ "
                        "(keeps ΔW's own precision)")
    g.add_argument("--train_text_encoder", action="store_true",
                   help="also train LoHa on both CLIP text encoders (the preset's text-encoder modules)")
    g.add_argument("--network_weights", default=None,
                   help="start from this LoHa (any layout loha reads: kohya/LyCORIS/ComfyUI file, PEFT folder); its "
                        "modules, ranks and alphas must be this run's; default: none (a new adapter)")
    g.add_argument("--dim_from_weights", action="store_true",
                   help="take the rank, alpha, modules and conv settings from --network_weights (kohya's flag); "
                        "default: off")

    g = p.add_argument_group("loss and noise")
    g.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default=None,
                   help="what the UNet predicts (v_prediction for v-pred bases such as NoobAI-XL V-Pred); default: "
                        "the model's scheduler config")
    g.add_argument("--zero_terminal_snr", **on_off,
                   help="rescale the noise schedule to zero SNR at the last timestep (Lin et al. 2023; kohya's and "
                        "diffusers' flag; use it with --prediction_type v_prediction); default: off")
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="min-SNR loss weighting γ (5.0 is the paper's); default: off")
    g.add_argument("--noise_offset", type=float, default=0.0, help="per-channel noise offset (e.g. 0.05); 0: off")
    g.add_argument("--min_timestep", type=int, default=None,
                   help="smallest timestep drawn (timesteps are drawn from [min, max)); default: 0")
    g.add_argument("--max_timestep", type=int, default=None,
                   help="draw timesteps below this; equal to --min_timestep: always that timestep; default: the "
                        "scheduler's num_train_timesteps (1000)")
    g.add_argument("--loss_type", choices=loha_losses.LOSS_TYPES, default="l2",
                   help="l2 (squared error), l1, huber or smooth_l1 (pseudo-Huber, kohya's semantics); default: l2")
    g.add_argument("--huber_c", type=float, default=None,
                   help="the Huber threshold c, in (0, 1]; default: 0.1 (with --loss_type huber or smooth_l1)")
    g.add_argument("--huber_schedule", choices=loha_losses.HUBER_SCHEDULES, default=None,
                   help="how the threshold follows the timestep: snr, exponential or constant (kohya's); default: snr")
    g.add_argument("--huber_scale", type=float, default=None,
                   help="multiplier of the exponential and constant schedules' threshold; default: 1.0")
    g.add_argument("--debiased_estimation_loss", **on_off,
                   help="weight the loss by 1/sqrt(SNR) (1/(SNR+1) for v-prediction), Yu et al. 2024; default: off")
    g.add_argument("--ip_noise_gamma", type=float, default=0.0,
                   help="input perturbation: the noisy latents get noise + gamma x another noise, the target stays "
                        "the first (Ning et al. 2023; 0.1 is usual); default: 0 (off)")
    g.add_argument("--ip_noise_gamma_random_strength", **on_off,
                   help="draw each sample's perturbation strength uniformly from [0, --ip_noise_gamma]; default: off")

    g = p.add_argument_group("optimization")
    g.add_argument("--train_batch_size", type=int, default=2, help="images per batch on each device")
    g.add_argument("--num_train_epochs", type=int, default=100, help="passes over the data (unless --max_train_steps)")
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="optimizer updates in all, overriding --num_train_epochs; default: none (from the epochs)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer update")
    g.add_argument("--gradient_checkpointing", **on_off, help="recompute activations in backward: less memory, slower")
    g.add_argument("--learning_rate", type=float, default=1e-4,
                   help="peak learning rate, in (0, 1] (Prodigy, DAdaptAdam: 1.0); default: 1e-4")
    g.add_argument("--unet_lr", type=float, default=None,
                   help="the UNet adapter's learning rate; 0 freezes it; default: --learning_rate")
    g.add_argument("--text_encoder_lr", type=float, nargs="+", default=None,
                   help="the text encoders' learning rate: one value for both, or two (CLIP-L, then OpenCLIP-G), as "
                        "kohya; 0 freezes that encoder's adapter; needs --train_text_encoder; default: --learning_rate")
    g.add_argument("--scale_lr", action="store_true",
                   help="multiply the learning rate by accumulation x batch x processes")
    g.add_argument("--lr_scheduler", default="constant", choices=loha_opt.SCHEDULES,
                   help="learning-rate schedule: diffusers' names, and adafactor (for Adafactor's relative step); "
                        "default: constant")
    g.add_argument("--lr_step_rules", default=None,
                   help="piecewise_constant's rules, diffusers' format: 'multiplier:until_step,...,final', e.g. "
                        "'1:100,0.5:200,0.1'; default: none")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="optimizer updates of linear warm-up")
    g.add_argument("--lr_num_cycles", type=int, default=1, help="cycles of cosine_with_restarts")
    g.add_argument("--lr_power", type=float, default=1.0, help="power of the polynomial schedule")
    g.add_argument("--optimizer", "--optimizer_type", default="AdamW", type=optimizer_arg,
                   help=f"one of {', '.join(loha_opt.OPTIMIZERS)} (case does not matter; kohya's --optimizer_type); "
                        "all but AdamW (torch's fused) come from their own packages; default: AdamW")
    g.add_argument("--use_8bit_adam", dest="optimizer", action="store_const", const="AdamW8bit",
                   help="diffusers' name for --optimizer AdamW8bit (bitsandbytes)")
    g.add_argument("--optimizer_args", nargs="+", default=None, metavar="KEY=VALUE",
                   help="keyword arguments of the optimizer, kohya's format (e.g. decouple=True "
                        "use_bias_correction=True d_coef=1); default: none")
    g.add_argument("--adam_beta1", type=float, default=None, help="AdamW/AdamW8bit β1; default: 0.9")
    g.add_argument("--adam_beta2", type=float, default=None, help="AdamW/AdamW8bit β2; default: 0.999")
    g.add_argument("--adam_weight_decay", type=float, default=None,
                   help="AdamW/AdamW8bit decoupled weight decay; default: 1e-2")
    g.add_argument("--adam_epsilon", type=float, default=None, help="AdamW/AdamW8bit ε; default: 1e-8")
    g.add_argument("--scale_weight_norms", type=float, default=None,
                   help="max-norm: after each update, an adapter whose ||scale x dW|| exceeds this is scaled down to "
                        "it (kohya's flag; 1 to 5 is usual); default: none")
    g.add_argument("--use_ema", **on_off,
                   help="keep an exponential moving average of the adapter (diffusers' EMAModel, warming up as "
                        "(1+n)/(10+n)); the outputs, samples and validation use it, and <output_name>-raw.safetensors "
                        "keeps the trained weights; default: off")
    g.add_argument("--ema_decay", type=float, default=0.999, help="the EMA's decay, in (0, 1); default: 0.999")
    g.add_argument("--max_grad_norm", type=float, default=1.0,
                   help="clip the gradient's global norm to this; 0: no clipping; default: 1.0")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="dtype of the frozen weights and activations (LoHa factors stay fp32); default: "
                        "accelerate's config")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs")
    g.add_argument("--compile", **on_off,
                   help="torch.compile the UNet (GPU; on CPU only with --compile_backend aot_eager)")
    g.add_argument("--compile_mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode; reduce-overhead captures CUDA graphs (one per bucket shape)")
    g.add_argument("--compile_backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                   help="torch.compile backend (aot_eager: traced graphs without code generation)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random draw (init, data order, noise, crops)")

    g = p.add_argument_group("checkpoints, validation, logging")
    g.add_argument("--output_dir", default="loha-sdxl",
                   help="folder for the adapter, checkpoints, samples and logs (one run at a time)")
    g.add_argument("--output_name", default="loha", help="file name (without .safetensors) of the kohya file")
    g.add_argument("--kohya_naming", default="sgm", choices=["sgm", "diffusers"],
                   help="module names in the kohya file: sgm (kohya/ComfyUI/A1111's lora_unet_input_blocks_…) or "
                        "diffusers (LyCORIS's lycoris_down_blocks_…)")
    g.add_argument("--save_precision", choices=["fp32", "float", "fp16", "bf16"], default="fp32",
                   help="dtype of the factors in the saved adapters (float is kohya's name for fp32; checkpoints "
                        "always keep fp32); default: fp32")
    g.add_argument("--checkpointing_steps", type=int, default=500,
                   help="save a checkpoint every this many updates, with <output_name>-step<N>.safetensors beside the "
                        "final file; default: 500")
    g.add_argument("--checkpoints_total_limit", type=int, default=None,
                   help="keep only this many newest checkpoints and their step files (never the final file); "
                        "default: all")
    g.add_argument("--save_every_n_epochs", type=int, default=None,
                   help="also write <output_name>-<epoch, 6 digits>.safetensors after every N epochs (not after the "
                        "last: that is the final file), kohya's naming; default: none")
    g.add_argument("--save_last_n_epochs", type=int, default=None,
                   help="keep only the newest N of those epoch files; default: all")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' or a checkpoint-<step> folder; default: none (a new run)")
    g.add_argument("--validation_prompt", action="append", default=None,
                   help="prompt for sample images (repeatable); default: none (no samples)")
    g.add_argument("--num_validation_images", type=int, default=4, help="sample images per validation prompt")
    g.add_argument("--validation_steps", type=int, default=500,
                   help="render the --validation_prompt images and compute the validation loss every this many "
                        "updates")
    g.add_argument("--num_validation_inference_steps", type=int, default=25, help="sampling steps per sample image")
    g.add_argument("--sample_prompts", default=None,
                   help="kohya's sample-prompt file: a prompt a line, with --n negative --w width --h height --d seed "
                        "--l cfg --s steps --ss sampler; defaults: no negative, --resolution, --seed, 7.5, 30, "
                        "--sample_sampler; images go to samples/step-<N>-<prompt>-seed<S>.png; default: none")
    g.add_argument("--sample_every_n_steps", type=int, default=None,
                   help="render --sample_prompts every N updates; default: none")
    g.add_argument("--sample_every_n_epochs", type=int, default=None,
                   help="render --sample_prompts after every N epochs; default: none")
    g.add_argument("--sample_sampler", type=sampler_arg, default="Euler",
                   help=f"sampler of --sample_prompts lines without --ss: {', '.join(loha_sampling.SAMPLERS)} "
                        "(infer.py's names); default: Euler")
    g.add_argument("--sample_at_first", **on_off,
                   help="also render --sample_prompts before the first update; default: off")
    g.add_argument("--report_to", choices=["tensorboard", "wandb", "none"], default="tensorboard",
                   help="where losses and samples are logged")
    g.add_argument("--logging_dir", default="logs",
                   help="log folder, relative to --output_dir; each run writes its own run-<time> subfolder")
    return p


def optimizer_arg(text: str) -> str:
    try:
        return loha_opt.canonical(text)
    except LoHaError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def sampler_arg(text: str) -> str:
    try:
        return loha_sampling.sampler_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        defaults = demo_defaults()
        defaults["pretrained_model_name_or_path"] = args.demo_model_dir
        parser.set_defaults(**defaults)
        args = parser.parse_args(argv)
    try:
        check_args(args)
        if args.dim_from_weights:
            given = sorted(explicit_flags(argv) & set(WEIGHTS_SETTINGS))
            if given:
                raise LoHaError(f"--dim_from_weights takes {', '.join('--' + g for g in given)} from "
                                "--network_weights; drop them, or drop --dim_from_weights")
    except LoHaError as e:
        parser.error(str(e))
    return args


# What --dim_from_weights reads from the file instead of the flags.
WEIGHTS_SETTINGS = ("rank", "alpha", "conv_rank", "conv_alpha", "use_tucker", "preset", "target_modules")


def check_args(args):
    """Refuse bad values and flag combinations before anything is loaded."""
    def need(ok, message):
        if not ok:
            raise LoHaError(message)

    need(sum(x is not None for x in (args.dataset_name, args.train_data_dir, args.dataset_config)) == 1,
         "give exactly one of --train_data_dir, --dataset_name and --dataset_config")
    need(args.reg_data_dir is None or args.dataset_config is None,
         "--reg_data_dir goes into the --dataset_config file (a subset with is_reg = true)")
    need(args.prior_loss_weight >= 0 and math.isfinite(args.prior_loss_weight),
         f"--prior_loss_weight must be >= 0, got {args.prior_loss_weight}")
    need(args.keep_tokens >= 0 and args.caption_variants >= 1, "--keep_tokens must be >= 0, --caption_variants >= 1")
    need(args.caption_separator != "", "--caption_separator must not be empty")
    need(args.mask_data_dir is None or args.masked_loss, "--mask_data_dir needs --masked_loss")
    for name in ("min_bucket_reso", "max_bucket_reso"):
        need(getattr(args, name) is None or getattr(args, name) % args.bucket_reso_steps == 0,
             f"--{name} must be a multiple of --bucket_reso_steps ({args.bucket_reso_steps})")
    need(args.bucket_reso_steps >= 8 and args.bucket_reso_steps % 8 == 0,
         "--bucket_reso_steps must be a positive multiple of 8")
    step = 64 if args.enable_bucket else 8
    need(args.resolution >= step and args.resolution % step == 0,
         f"--resolution must be a positive multiple of {step}{' with --enable_bucket' if step == 64 else ''}, "
         f"got {args.resolution}")
    need(args.rank >= 1, f"--rank must be >= 1, got {args.rank}")
    need(args.alpha is None or (math.isfinite(args.alpha) and args.alpha > 0),
         f"--alpha must be a finite number > 0, got {args.alpha}")
    need(math.isfinite(args.learning_rate) and 0 < args.learning_rate <= 1,
         f"--learning_rate must be in (0, 1], got {args.learning_rate}")
    for name in ("train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "checkpointing_steps",
                 "validation_steps", "num_validation_images", "num_validation_inference_steps", "lr_num_cycles"):
        need(getattr(args, name) >= 1, f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_train_steps", "checkpoints_total_limit", "max_train_samples"):
        need(getattr(args, name) is None or getattr(args, name) >= 1, f"--{name} must be >= 1")
    for name in ("lr_warmup_steps", "dataloader_num_workers", "noise_offset"):
        need(getattr(args, name) >= 0, f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("caption_dropout", "caption_tag_dropout_rate", "rank_dropout", "module_dropout"):
        need(0 <= getattr(args, name) < 1, f"--{name} must be in [0, 1), got {getattr(args, name)}")
    need(args.snr_gamma is None or args.snr_gamma > 0, f"--snr_gamma must be > 0, got {args.snr_gamma}")
    need(args.max_grad_norm >= 0, f"--max_grad_norm must be >= 0, got {args.max_grad_norm}")
    check_optimizer_args(args, need)
    check_loss_args(args, need)
    check_output_args(args, need)
    need(not (args.train_text_encoder and args.cache_text_embeddings),
         "--train_text_encoder cannot be combined with --cache_text_embeddings: the embeddings change as "
         "the encoders train")
    need(args.target_modules is None or bool(target_modules(args)), "--target_modules is empty")
    need(args.target_modules is None or args.preset is None, "give --preset or --target_modules, not both")
    need(args.conv_rank is None or args.conv_rank >= 1, f"--conv_rank must be >= 1, got {args.conv_rank}")
    need(args.conv_alpha is None or (math.isfinite(args.conv_alpha) and args.conv_alpha > 0),
         f"--conv_alpha must be a finite number > 0, got {args.conv_alpha}")
    need(args.report_to == "none" or importlib.util.find_spec(args.report_to) is not None,
         f"--report_to {args.report_to} needs `pip install {args.report_to}` (or use --report_to none)")
    need(re.fullmatch(r"[\w.+-]+", args.output_name) is not None,
         f"--output_name must be a plain file name, got {args.output_name!r}")
    local = args.dataset_name if args.dataset_name and Path(args.dataset_name).is_dir() else None
    for data in (args.train_data_dir or local, args.reg_data_dir):
        if data:
            out, src = Path(args.output_dir).resolve(), Path(data).resolve()
            need(not (out == src or src in out.parents or out in src.parents),
                 f"--output_dir {args.output_dir} {'is' if out == src else 'overlaps'} the image folder {data}: "
                 "its model card, samples and checkpoints would land among the training images; choose a folder "
                 "outside it")
    if args.cache_text_embeddings is None:
        args.cache_text_embeddings = not args.train_text_encoder
    if args.feature_cache_dir is None:
        hf_home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
        args.feature_cache_dir = os.path.join(hf_home, "loha-sdxl-features")


def check_optimizer_args(args, need):
    """The optimizer is installed and takes its arguments; the learning rates per part and the schedule fit it."""
    loha_opt.optimizer_class(args.optimizer)  # one line with the pip command when the package is missing
    options = loha_opt.parse_args(args.optimizer_args)
    adam = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_weight_decay": 1e-2, "adam_epsilon": 1e-8}
    for flag, default in adam.items():
        if args.optimizer in loha_opt.ADAM_FAMILY:
            setattr(args, flag, default if getattr(args, flag) is None else getattr(args, flag))
        else:
            need(getattr(args, flag) is None, f"--{flag} sets AdamW's {flag[5:]}; {args.optimizer} takes its settings "
                                              "through --optimizer_args")
    if args.optimizer in loha_opt.ADAM_FAMILY:
        need(0 <= args.adam_beta1 < 1 and 0 <= args.adam_beta2 < 1 and args.adam_epsilon > 0
             and args.adam_weight_decay >= 0, "Adam betas must be in [0, 1), epsilon > 0, weight decay >= 0")
        taken = sorted(set(options) & {"lr", "betas", "eps", "weight_decay"})
        need(not taken, f"--optimizer_args {', '.join(taken)}: use --adam_beta1/--adam_beta2/--adam_epsilon/"
                        "--adam_weight_decay (and --learning_rate) for AdamW")
    need("lr" not in options, "--optimizer_args lr=...: use --learning_rate (or --unet_lr/--text_encoder_lr)")
    for name in ("unet_lr", "text_encoder_lr"):
        for value in (getattr(args, name) if isinstance(getattr(args, name), list) else [getattr(args, name)]):
            need(value is None or (math.isfinite(value) and 0 <= value <= 1),
                 f"--{name} must be in [0, 1], got {value}")
    need(args.text_encoder_lr is None or len(args.text_encoder_lr) <= 2,
         "--text_encoder_lr takes one value (both encoders) or two (CLIP-L, then OpenCLIP-G)")
    need(args.text_encoder_lr is None or args.train_text_encoder, "--text_encoder_lr needs --train_text_encoder")
    rates = part_learning_rates(args)
    need(any(rates.values()), "every learning rate is 0: nothing would train (" + ", ".join(
        f"{part} {lr:g}" for part, lr in rates.items()) + ")")
    need(args.optimizer not in loha_opt.ONE_STEP_SIZE or len({lr for lr in rates.values() if lr}) == 1,
         f"{args.optimizer} adapts one step size for every part: give the UNet and the text encoders the same "
         "learning rate (1.0 is usual), or 0 to freeze one")
    if loha_opt.relative_step(args.optimizer, options):
        need(args.lr_scheduler == "adafactor",
             "Adafactor with relative_step=True (its default) chooses its own step size: use --lr_scheduler adafactor, "
             "or --optimizer_args relative_step=False scale_parameter=False warmup_init=False with a learning rate")
        need(len({lr for lr in rates.values() if lr}) == 1,
             "Adafactor with relative_step=True has one step size for every part: per-part learning rates need "
             "--optimizer_args relative_step=False")
    else:
        need(args.lr_scheduler != "adafactor", "--lr_scheduler adafactor goes with Adafactor's relative step "
                                               "(--optimizer Adafactor without relative_step=False)")
    need((args.lr_scheduler == "piecewise_constant") == (args.lr_step_rules is not None),
         "--lr_step_rules goes with --lr_scheduler piecewise_constant, and that schedule needs it")


def part_learning_rates(args) -> dict[str, float]:
    """The learning rate of each trained part (before --scale_lr): 0 freezes a part."""
    base = args.learning_rate
    rates = {"unet": base if args.unet_lr is None else args.unet_lr}
    if args.train_text_encoder:
        te = args.text_encoder_lr or [base]
        rates.update(text_encoder=te[0], text_encoder_2=te[-1])
    return rates


def check_loss_args(args, need):
    need(args.min_timestep is None or args.min_timestep >= 0, f"--min_timestep must be >= 0, got {args.min_timestep}")
    need(args.max_timestep is None or args.max_timestep >= 1, f"--max_timestep must be >= 1, got {args.max_timestep}")
    need(args.min_timestep is None or args.max_timestep is None or args.min_timestep <= args.max_timestep,
         f"--min_timestep {args.min_timestep} is above --max_timestep {args.max_timestep}")
    huber = args.loss_type in ("huber", "smooth_l1")
    for flag, default in (("huber_c", 0.1), ("huber_schedule", "snr"), ("huber_scale", 1.0)):
        need(huber or getattr(args, flag) is None, f"--{flag} goes with --loss_type huber or smooth_l1")
        if huber and getattr(args, flag) is None:
            setattr(args, flag, default)
    if huber:
        need(0 < args.huber_c <= 1, f"--huber_c must be in (0, 1], got {args.huber_c}")
        need(args.huber_scale > 0 and math.isfinite(args.huber_scale), f"--huber_scale must be > 0, got "
                                                                         f"{args.huber_scale}")
    need(args.ip_noise_gamma >= 0 and math.isfinite(args.ip_noise_gamma),
         f"--ip_noise_gamma must be >= 0, got {args.ip_noise_gamma}")
    need(not args.ip_noise_gamma_random_strength or args.ip_noise_gamma > 0,
         "--ip_noise_gamma_random_strength needs --ip_noise_gamma")


def check_output_args(args, need):
    """Saving, sampling, EMA, max-norm, validation and a starting LoHa."""
    for name in ("save_every_n_epochs", "save_last_n_epochs", "sample_every_n_steps", "sample_every_n_epochs"):
        need(getattr(args, name) is None or getattr(args, name) >= 1, f"--{name} must be >= 1")
    need(args.save_last_n_epochs is None or args.save_every_n_epochs,
         "--save_last_n_epochs needs --save_every_n_epochs")
    sampling = ("sample_every_n_steps", "sample_every_n_epochs", "sample_at_first")
    need(args.sample_prompts is not None or not any(getattr(args, n) for n in sampling),
         "--sample_every_n_steps, --sample_every_n_epochs and --sample_at_first need --sample_prompts")
    if args.sample_prompts:
        loha_sampling.read_prompts(args.sample_prompts)  # a bad line is refused now, before anything loads
    need(args.scale_weight_norms is None or (args.scale_weight_norms > 0 and math.isfinite(args.scale_weight_norms)),
         f"--scale_weight_norms must be > 0, got {args.scale_weight_norms}")
    need(0 < args.ema_decay < 1, f"--ema_decay must be in (0, 1), got {args.ema_decay}")
    need(args.validation_split is None or 0 < args.validation_split < 1,
         f"--validation_split must be in (0, 1), got {args.validation_split}")
    need(args.validation_split is None or args.validation_data_dir is None,
         "give --validation_split or --validation_data_dir, not both")
    need(args.validation_data_dir is None or Path(args.validation_data_dir).is_dir(),
         f"--validation_data_dir {args.validation_data_dir} is not a folder")
    need(not args.dim_from_weights or args.network_weights, "--dim_from_weights needs --network_weights")
    need(args.network_weights is None or Path(args.network_weights).exists(),
         f"--network_weights {args.network_weights} does not exist")


def target_modules(args) -> list[str] | None:
    if args.target_modules is None:
        return None
    return [t.strip() for t in args.target_modules.split(",") if t.strip()]


# ==================================================================================== accelerator
def check_compile_supported(args, device):
    """Measured with torch 2.13 (tests/test_train.py::test_inductor_cpu_weight_gradients_are_wrong): the
    compiled tiny SDXL UNet gets weight gradients off by 30 % to 400x from eager whenever its input needs
    no gradient, as in training; plain trainable Linear weights too, so the fault is not in LoHa."""
    if args.compile and device.type == "cpu" and args.compile_backend == "inductor":
        raise LoHaError("--compile on CPU: torch.compile's CPU backend (inductor) computes wrong weight "
                        "gradients for the SDXL UNet; train without --compile on CPU (or test the traced "
                        "graphs with --compile_backend aot_eager)")
    if args.compile_mode == "reduce-overhead" and device.type != "cuda":
        raise LoHaError("--compile_mode reduce-overhead captures CUDA graphs and needs a CUDA device")


def start_accelerator(args, held: contextlib.ExitStack):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    check_output_dir(args.output_dir)
    # Each run logs into a folder of its own, so a second run's event files never mix with the first's.
    stamp = time.strftime("run-%Y%m%d-%H%M%S")
    args.run_logging_dir = os.path.join(args.output_dir, args.logging_dir, stamp)
    for n in range(2, 1000):  # two runs in one second still log apart
        if not os.path.exists(args.run_logging_dir):
            break
        args.run_logging_dir = os.path.join(args.output_dir, args.logging_dir, f"{stamp}-{n}")
    try:
        accelerator = Accelerator(
            mixed_precision=args.mixed_precision, log_with=None if args.report_to == "none" else args.report_to,
            project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=args.run_logging_dir),
            step_scheduler_with_optimizer=False,  # one scheduler step per update, whatever the process count
            # CLIP-L's last layer feeds nothing SDXL reads (it takes the penultimate states), so its
            # adapters get no gradient; DDP must be told to expect that.
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=args.train_text_encoder)])
    except ValueError as e:  # e.g. fp16 asked for on a machine without a GPU
        raise LoHaError(loha_cli.first_line(e)) from None
    check_compile_supported(args, accelerator.device)
    if accelerator.is_main_process:
        held.enter_context(loha_runs.OutputLock(args.output_dir))
        remove_abandoned_checkpoints(args.output_dir)  # only dead runs leave them: this run holds the lock
        out = Path(args.output_dir)
        earlier = (out / "unet").exists() or (out / f"{args.output_name}.safetensors").exists()
        if earlier and not args.resume_from_checkpoint:
            print(f"note: {out} holds an earlier run's outputs; this run replaces them (its logs go to "
                  f"{Path(args.run_logging_dir).relative_to(out)})", file=sys.stderr)
    accelerator.wait_for_everyone()
    set_seed(args.seed)  # adapter init and dropout; data and noise use their own seeded generators
    if args.demo and "OMP_NUM_THREADS" not in os.environ:
        # The tiny model's ops are too small to split across threads: one thread is as fast on an idle
        # machine, and 5-10x faster on a busy one (measured on a shared 2-core box).
        torch.set_num_threads(1)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def check_output_dir(output_dir):
    """Fail now, in one line, rather than after an hour of training."""
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise LoHaError(f"--output_dir {output_dir} is not writable: {e.strerror or e}") from None


# ========================================================================================= models
@dataclasses.dataclass
class Models:
    tokenizer: object
    tokenizer_2: object
    text_encoder: torch.nn.Module
    text_encoder_2: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object  # DDPM with the model's betas: adds noise for training
    sampling_scheduler: object  # the model's own scheduler class: for validation images
    weight_dtype: torch.dtype
    vae_id: str
    text_id: str


def load_models(args, accelerator) -> Models:
    """Load every SDXL component the way a hub model is loaded (a diffusers folder, hub id or single file), in the
    dtype it trains in, the UNet's frozen weights in fp8 with --base_precision fp8; freeze them; put them on the
    device."""
    loha_hub.import_sdxl_pipeline()  # first, so diffusers' imports make no torchvision notice
    if args.demo and accelerator.is_main_process:
        from loha.tiny_sdxl import build_tiny_sdxl_pipeline
        build_tiny_sdxl_pipeline(args.pretrained_model_name_or_path)
    accelerator.wait_for_everyone()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    # SDXL's own VAE overflows in fp16; a fixed VAE (e.g. the fp16-fix) may use the training dtype.
    vae_dtype = weight_dtype if args.pretrained_vae_model_name_or_path else torch.float32
    source = base_source(args)
    parts = loha_sources.load_components(source, weight_dtype, vae_dtype,
                                         need_vae=not args.pretrained_vae_model_name_or_path)
    if args.pretrained_vae_model_name_or_path:
        parts["vae"] = loha_sources.load_vae(args.pretrained_vae_model_name_or_path, vae_dtype,
                                             config=source.configs, cache_dir=args.cache_dir)
    noise_scheduler, sampling_scheduler = make_schedulers(parts["scheduler_config"], args)
    if args.base_precision == "fp8":
        loha_fp8.store_fp8(parts["unet"].requires_grad_(False))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        model = parts[name]
        model.requires_grad_(False)
        model.to(accelerator.device)
        if accelerator.device.type == "cpu":  # fresh, equally aligned storage whatever the file layout, so that
            for t in (*model.parameters(), *model.buffers()):  # a single file and its folder train bit for bit alike
                t.data = t.data.clone()
    model_id = [args.pretrained_model_name_or_path, args.revision, args.variant]
    vae, te1, te2 = parts["vae"], parts["text_encoder"], parts["text_encoder_2"]
    return Models(parts["tokenizer"], parts["tokenizer_2"], te1, te2, vae, parts["unet"], noise_scheduler,
                  sampling_scheduler, weight_dtype,
                  vae_id=json.dumps([args.pretrained_vae_model_name_or_path or model_id, str(vae_dtype),
                                     dict(vae.config)], default=str),
                  text_id=json.dumps([model_id, str(weight_dtype), te1.config.to_dict(), te2.config.to_dict()],
                                     default=str))


def base_source(args) -> loha_sources.Source:
    return loha_sources.resolve(args.pretrained_model_name_or_path, config=args.config, revision=args.revision,
                                variant=args.variant, cache_dir=args.cache_dir)


def recorded_base(args) -> str:
    """The base as files record it: an absolute path (a folder or single file here) or a hub id."""
    name = args.pretrained_model_name_or_path
    return str(Path(name).resolve()) if Path(name).exists() else name


def make_schedulers(config: dict, args):
    """(DDPM with the model's betas, to add noise in training; the model's own scheduler class, to sample), both
    with --prediction_type and --zero_terminal_snr applied."""
    import diffusers

    overrides = {}
    if args.prediction_type:
        overrides["prediction_type"] = args.prediction_type
    if args.zero_terminal_snr:
        overrides["rescale_betas_zero_snr"] = True
    noise = diffusers.DDPMScheduler.from_config(config, **overrides)
    sampling_class = getattr(diffusers, config.get("_class_name", ""), diffusers.EulerDiscreteScheduler)
    sampling = sampling_class.from_config(config, **overrides)
    if args.zero_terminal_snr and "timestep_spacing" in sampling.config:  # the last step must reach SNR 0
        sampling.register_to_config(timestep_spacing="trailing")
    return noise, sampling


def add_adapters(models: Models, args):
    """LoHa on the preset's (or --target_modules') UNet modules, and with --train_text_encoder on the
    CLIPs' (the preset's text-encoder modules); factors in fp32. In grouped mode the factors of each
    shape are stored stacked (what that mode runs on); the per-layer modes keep them per layer, where
    they are faster (BENCHMARKS.md)."""
    run_options = dict(rank_dropout=args.rank_dropout, module_dropout=args.module_dropout,
                       forward_mode=args.loha_forward_mode, dtype=torch.float32,
                       stack=args.loha_forward_mode == "grouped")
    shape = dict(rank=args.rank, alpha=args.alpha, conv_rank=args.conv_rank, conv_alpha=args.conv_alpha,
                 use_tucker=args.use_tucker)
    if args.dim_from_weights:
        load_network_weights(models, args, run_options)
    else:
        loha.inject(models.unet, target_modules=target_modules(args), preset=args.preset, **shape, **run_options)
        if args.train_text_encoder:
            # CLIP-L's last layer feeds nothing SDXL reads (it takes the penultimate states): stacked with its
            # neighbours it gets zero gradients, and weight decay shrinks factors that change no output.
            for encoder in (models.text_encoder, models.text_encoder_2):
                loha.inject(encoder, preset=args.preset, **shape, **run_options)
        if args.network_weights:
            load_network_weights(models, args)
    for part, lr in part_learning_rates(args).items():
        if lr == 0:  # frozen exactly: no gradient, no optimizer state, no weight decay
            for p in loha.trainable_parameters(getattr(models, part)):
                p.requires_grad_(False)
    if args.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            models.text_encoder.gradient_checkpointing_enable()
            models.text_encoder_2.gradient_checkpointing_enable()


def load_network_weights(models: Models, args, inject_options: dict | None = None):
    """--network_weights into the run's adapters: strictly (its modules and ranks must be the run's, and its
    alphas, which loading would otherwise adopt); with --dim_from_weights (``inject_options`` given) the
    adapters are made from the file, and the flags that describe them are set to the file's values."""
    file = args.network_weights
    adapter = loha.read_adapter(file)
    hint = "; or take the file's settings with --dim_from_weights"
    parts = set(adapter.components)
    if not args.train_text_encoder and parts - {"unet"}:
        raise LoHaError(f"--network_weights {file} also adapts the text encoders: train them too with "
                        "--train_text_encoder, or extract its UNet part first")
    if args.train_text_encoder and parts != {"unet", "text_encoder", "text_encoder_2"}:
        raise LoHaError(f"--network_weights {file} adapts {', '.join(sorted(parts))} only, but "
                        "--train_text_encoder trains both text encoders' adapters too")
    unusual = sorted({path for modules in adapter.components.values() for path, mw in modules.items()
                      if mw.factors is None or mw.dora_scale is not None})
    if unusual:
        raise LoHaError(f"--network_weights {file} has modules this trainer does not train (DoRA or full "
                        f"differences), e.g. {unusual[0]}")
    target = SimpleNamespace(**{c: getattr(models, c) for c in adapter.components})
    before = {c: {p: layer.alpha for p, layer in loha.loha_layers(getattr(models, c)).items()} for c in parts}
    try:
        loha.load(target, adapter, **(inject_options or {}))
    except loha.LoHaFileError as e:
        library_hint = re.compile(r";? call loha\.eject\(model\) first to load a different adapter")
        raise LoHaError(f"--network_weights: {library_hint.sub('', str(e))}" + ("" if inject_options else hint)) \
            from None
    if inject_options is None:
        for c in sorted(parts):
            for path, layer in loha.loha_layers(getattr(models, c)).items():
                if not math.isclose(layer.alpha, before[c][path], rel_tol=1e-6):
                    raise LoHaError(f"--network_weights {file}: {c} {path} has alpha {layer.alpha:g} in the file but "
                                    f"{before[c][path]:g} in this run (--alpha / --conv_alpha){hint}")
        return
    wide = lambda layer: isinstance(layer, loha.LoHaConv2d) and layer.base_layer.kernel_size != (1, 1)
    layers = [layer for c in parts for layer in loha.loha_layers(getattr(models, c)).values()]
    narrow = [layer for layer in layers if not wide(layer)] or layers
    convs = [layer for layer in layers if wide(layer)]
    args.rank, args.alpha = narrow[0].rank, narrow[0].alpha
    args.conv_rank = convs[0].rank if convs else None
    args.conv_alpha = convs[0].alpha if convs else None
    args.use_tucker = any(layer.use_tucker for layer in convs)
    try:  # the LyCORIS preset the file says it was made with, for the record (the modules are the file's)
        args.preset = json.loads(adapter.metadata.get("ss_network_args", "{}")).get("preset")
    except (ValueError, AttributeError):
        args.preset = None


def trained_models(models: Models, args) -> dict[str, torch.nn.Module]:
    """The parts whose adapters train (learning rate above 0)."""
    return {part: getattr(models, part) for part, lr in part_learning_rates(args).items() if lr > 0}


def adapted_models(run, args) -> dict[str, torch.nn.Module]:
    """Every part with an adapter, trained or frozen (what the outputs hold), unwrapped."""
    parts = ["unet", *(["text_encoder", "text_encoder_2"] if args.train_text_encoder else [])]
    return {part: run.accelerator.unwrap_model(run.trained[part], keep_torch_compile=False) if part in run.trained
            else getattr(run.models, part) for part in parts}


def encode_prompts(models: Models, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning: both CLIPs' penultimate hidden states side by side, and encoder 2's pooled
    projection (what StableDiffusionXLPipeline.encode_prompt computes)."""
    hidden = []
    for tokenizer, encoder in ((models.tokenizer, models.text_encoder), (models.tokenizer_2, models.text_encoder_2)):
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), out[0]


def encode_latent_distribution(models: Models, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE posterior's parameters (mean and log-variance, 2x4 channels), sampled per step later."""
    vae = models.vae
    return vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.parameters


# =========================================================================================== data
@dataclasses.dataclass
class TrainingData:
    samples: list  # loha.data.CheckedSample, in index order
    skipped: list  # (name, reason)
    cache: loha_data.FeatureCache
    datasets: list  # loha.kohya_data.Dataset: the subsets with their resolution and batch size
    validation: list = dataclasses.field(default_factory=list)  # held-out CheckedSamples (validation loss)
    dataset: torch.utils.data.Dataset | None = None
    validation_set: torch.utils.data.Dataset | None = None


def default_subset(args) -> Subset:
    """The caption and augmentation rules the flags give every image (a dataset-config TOML's values win)."""
    return Subset(caption_extension=args.caption_extension, shuffle_caption=args.shuffle_caption,
                  keep_tokens=args.keep_tokens, keep_tokens_separator=args.keep_tokens_separator,
                  caption_separator=args.caption_separator, caption_prefix=args.caption_prefix,
                  caption_suffix=args.caption_suffix, caption_dropout_rate=args.caption_dropout,
                  caption_tag_dropout_rate=args.caption_tag_dropout_rate, flip_aug=args.random_flip)


def kohya_datasets(args) -> list[Dataset]:
    """The run's datasets: a --dataset_config TOML's; or one, at --resolution and --train_batch_size, of the
    --train_data_dir's N_name folders (kohya's layout) or of its listed images (a plain folder, metadata.jsonl,
    --dataset_name: a subset with image_dir None), plus --reg_data_dir's."""
    defaults = default_subset(args)
    sizes = dict(resolution=args.resolution, batch_size=args.train_batch_size, enable_bucket=args.enable_bucket,
                 min_bucket_reso=args.min_bucket_reso, max_bucket_reso=args.max_bucket_reso,
                 bucket_reso_steps=args.bucket_reso_steps)
    if args.dataset_config:
        cli = {**dataclasses.asdict(defaults), "image_dir": None, "class_tokens": None, **sizes}
        datasets, overridden = loha_kohya.read_config(args.dataset_config, cli)
        if overridden:
            print(f"note: --dataset_config {args.dataset_config} sets " + ", ".join(
                f"{k} {v} (the flags say {f})" for k, (v, f) in overridden.items()) + ": the file wins, as in kohya",
                file=sys.stderr)
        subsets = [s for d in datasets for s in d.subsets]
        loha_kohya.check_no_overlap([s.image_dir for s in subsets if not s.is_reg],
                                    [s.image_dir for s in subsets if s.is_reg])
        return datasets
    train = None
    if args.train_data_dir:
        train = loha_kohya.folder_subsets(args.train_data_dir, is_reg=False, defaults=defaults,
                                          what="--train_data_dir")
    reg = []
    if args.reg_data_dir:
        if args.train_data_dir:
            loha_kohya.check_no_overlap([args.train_data_dir], [args.reg_data_dir])
        reg = loha_kohya.folder_subsets(args.reg_data_dir, is_reg=True, defaults=defaults,
                                        what="--reg_data_dir") or [dataclasses.replace(
                                            defaults, image_dir=args.reg_data_dir, is_reg=True)]
    return [Dataset(subsets=tuple((train or [defaults]) + reg), **sizes)]


def listed_samples(args) -> list:
    """The samples of a plain --train_data_dir (metadata.jsonl, or images with caption files) or --dataset_name."""
    if args.train_data_dir:
        return loha_data.samples_from_folder(args.train_data_dir, args.caption_column, args.caption_extension)
    folder = Path(args.dataset_name)
    image_folder = folder if folder.is_dir() and not is_saved_dataset(folder) else None
    return loha_data.samples_from_dataset(load_hf_dataset(args), args.image_column, args.caption_column,
                                          root=image_folder)


def load_training_data(args, accelerator) -> TrainingData:
    """Find the samples of every subset, decode each image once (skipping broken ones), find masks, count each
    image's draws per epoch (repeats, regularization balance) and sort them into buckets."""
    datasets = kohya_datasets(args)
    samples = []
    for d, dataset in enumerate(datasets):
        for subset in dataset.subsets:
            if subset.image_dir is None:
                for s in listed_samples(args):
                    samples.append(dataclasses.replace(s, index=len(samples), subset=subset, dataset=d))
            else:
                samples += loha_data.samples_from_subset(subset, d, start=len(samples))
    samples = loha_data.select_samples(samples, args.max_train_samples, args.seed)
    report = loha_data.check_samples(samples, progress=progress_bar(accelerator, "checking images"))
    if report.skipped and accelerator.is_main_process:
        print(f"warning: skipped {len(report.skipped)} of {len(samples)} samples: "
              + "; ".join(f"{name} ({why})" for name, why in report.skipped[:10])
              + (" ..." if len(report.skipped) > 10 else ""), file=sys.stderr)
    if not [c for c in report.good if not c.sample.subset.is_reg]:
        raise LoHaError(f"no usable training images: all {len(samples)} samples were skipped")
    good, validation = report.good, []
    if args.validation_split:
        good, validation = loha_data.split_validation(good, args.validation_split, args.seed)
    elif args.validation_data_dir:
        validation = validation_samples(args, start=max(s.index for s in samples) + 1, accelerator=accelerator)
    if args.masked_loss and args.mask_data_dir:
        loha_data.find_masks(good + validation, args.mask_data_dir)
    loha_data.assign_draws(good)
    loha_data.assign_buckets(good + validation, args.resolution, args.enable_bucket, datasets)
    return TrainingData(good, report.skipped, loha_data.FeatureCache(args.feature_cache_dir), datasets, validation)


def validation_samples(args, start: int, accelerator) -> list:
    """--validation_data_dir's images: kohya's layout or a plain folder, under the flags' caption rules."""
    folder = args.validation_data_dir
    subsets = loha_kohya.folder_subsets(folder, is_reg=False, defaults=default_subset(args),
                                        what="--validation_data_dir")
    if subsets:
        samples = []
        for subset in subsets:
            samples += loha_data.samples_from_subset(subset, 0, start=start + len(samples))
    else:
        samples = [dataclasses.replace(s, index=start + s.index, subset=default_subset(args)) for s in
                   loha_data.samples_from_folder(folder, args.caption_column, args.caption_extension,
                                                 what="--validation_data_dir")]
    report = loha_data.check_samples(samples, progress=progress_bar(accelerator, "checking validation images"))
    if not report.good:
        raise LoHaError(f"--validation_data_dir {folder}: no usable image")
    return report.good


def is_saved_dataset(name) -> bool:
    """A folder written by save_to_disk (its image paths may point wherever the user's photos are)."""
    return Path(name).is_dir() and any((Path(name) / f).exists() for f in ("dataset_dict.json", "state.json"))


def load_hf_dataset(args):
    import datasets

    name = args.dataset_name
    try:
        if is_saved_dataset(name):
            dataset = datasets.load_from_disk(name)
        else:
            dataset = datasets.load_dataset(name, args.dataset_config_name, revision=args.revision,
                                            cache_dir=args.cache_dir)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        cause = e.__cause__ or e  # DatasetGenerationError wraps the reason, e.g. a file_name with ../ in it
        raise LoHaError(f"cannot load --dataset_name {name}: {loha_cli.first_line(cause)}") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise LoHaError(f"--dataset_name {name} has no 'train' split (it has {list(dataset)})")
        dataset = dataset["train"]
    return dataset


class SDXLTrainingSet(torch.utils.data.Dataset):
    """Items are addressed as (position, epoch, draw): the epoch and the draw (which of its repeats this is) pick
    the crop, flip, caption and noise. The validation set (``timesteps`` given) is fixed instead: the center crop,
    no flip, the caption without its random rules, and draw k is timestep ``timesteps[k]``."""

    def __init__(self, data: TrainingData, models: Models, args, timesteps: list[int] | None = None):
        self.samples, self.cache = data.validation if timesteps else data.samples, data.cache
        self.timesteps = timesteps
        self.vae_id, self.text_id = models.vae_id, models.text_id
        self.seed, self.center_crop = args.seed, args.center_crop
        self.cache_latents, self.cache_text = args.cache_latents, args.cache_text_embeddings
        self.variants = args.caption_variants if args.cache_text_embeddings else None
        self.prior_loss_weight, self.masked = args.prior_loss_weight, args.masked_loss
        self.mask_from_alpha = args.masked_loss and not args.mask_data_dir

    def __len__(self):
        return len(self.samples)

    def augmentation(self, sample, epoch, draw=0):
        if self.timesteps:
            return loha_data.Augmentation(0.5, 0.5, False)
        # Cached latents fix one crop/flip per image (the epoch-0 choice): that is what the cache holds.
        epoch, draw = (0, 0) if self.cache_latents else (epoch, draw)
        return loha_data.choose_augmentation(self.seed, epoch, sample.index, self.center_crop,
                                             sample.sample.subset.flip_aug, draw)

    def latent_key(self, sample, aug) -> str:
        return loha_data.content_key("latents", sample.index, sample.sha256, sample.bucket,
                                     dataclasses.astuple(aug), self.vae_id)

    def text_key(self, caption: str) -> str:
        return loha_data.content_key("text", caption, self.text_id)

    def fixed_caption(self, sample) -> str:
        caption = sample.sample.caption if isinstance(sample.sample.caption, str) else sample.sample.caption[0]
        rules = dataclasses.replace(sample.sample.subset, shuffle_caption=False, caption_tag_dropout_rate=0.0)
        return loha_kohya.process_caption(caption, rules, None)

    def captions(self):
        """Every caption the run can use: each of a list under its subset's rules (its N variants when they
        shuffle or drop tags), and the empty prompt where captions drop out."""
        if self.timesteps:
            return sorted({self.fixed_caption(s) for s in self.samples})
        found = set()
        for s in self.samples:
            subset = s.sample.subset
            if subset.caption_dropout_rate > 0:
                found.add("")
            for text in [s.sample.caption] if isinstance(s.sample.caption, str) else s.sample.caption:
                if subset.varies:
                    found.update(loha_data.caption_variant(text, subset, self.seed, v) for v in range(self.variants))
                else:
                    found.add(loha_kohya.process_caption(text, subset, None))
        return sorted(found)

    def __getitem__(self, key):
        position, epoch, draw = key
        sample = self.samples[position]
        subset = sample.sample.subset
        aug = self.augmentation(sample, epoch, draw)
        item = {"index": sample.index, "epoch": epoch, "draw": draw,
                "loss_weight": self.prior_loss_weight if subset.is_reg else 1.0}
        if self.timesteps:
            caption = self.fixed_caption(sample)
            item["timestep"] = self.timesteps[draw]
        else:
            caption = loha_data.choose_caption(sample.sample.caption, self.seed, epoch, sample.index,
                                               subset.caption_dropout_rate, draw, subset, self.variants)
        if self.cache_latents:
            item["latent_params"] = self._cached("latents", self.latent_key(sample, aug), sample.sample.name)["params"]
            time_ids = loha_data.crop_geometry(sample.width, sample.height, sample.bucket, aug)[2]
            item["time_ids"] = torch.tensor(time_ids, dtype=torch.float32)
        else:
            try:
                item["pixels"], item["time_ids"] = loha_data.pixels_and_time_ids(
                    sample.sample.read_bytes(), sample.bucket, aug)
            except Exception as e:  # it decoded when checked: the file changed during the run
                raise LoHaError(f"{sample.sample.name} can no longer be read: {e}") from None
        if self.masked:
            item["mask"] = loha_data.mask_tensor(sample, aug, from_alpha=self.mask_from_alpha or subset.alpha_mask)
        if self.cache_text:
            cached = self._cached("text", self.text_key(caption), repr(caption))
            item["prompt_embeds"], item["pooled"] = cached["prompt_embeds"], cached["pooled"]
        else:
            item["caption"] = caption
        return item

    def _cached(self, kind, key, what):
        tensors = self.cache.get(kind, key)
        if tensors is None:
            raise LoHaError(f"the {kind} cache entry for {what} disappeared from {self.cache.root} during the run")
        return tensors


def collate(items: list[dict]) -> dict:
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


@torch.no_grad()
def cache_features(data: TrainingData, models: Models, args, accelerator):
    """Compute missing latents / text embeddings once (main process first), then free the device."""
    data.dataset = dataset = SDXLTrainingSet(data, models, args)
    sets = [dataset]
    if data.validation:
        low, high = timestep_range(args, models.noise_scheduler)
        data.validation_set = SDXLTrainingSet(data, models, args, loha_data.validation_timesteps(low, high))
        sets.append(data.validation_set)
    with accelerator.main_process_first():
        if args.cache_latents:
            todo = [(s, d.augmentation(s, 0, 0)) for d in sets for s in d.samples]
            todo = [(s, aug, dataset.latent_key(s, aug)) for s, aug in todo]
            todo = [t for t in todo if not data.cache.has("latents", t[2], ("params",))]
            for sample, aug, key in progress_bar(accelerator, "caching latents")(todo):
                pixels, _ = loha_data.pixels_and_time_ids(sample.sample.read_bytes(), sample.bucket, aug)
                params = encode_latent_distribution(models, pixels[None])[0]
                data.cache.put("latents", key, {"params": params})
        if args.cache_text_embeddings:
            todo = [c for c in sorted({c for d in sets for c in d.captions()})
                    if not data.cache.has("text", dataset.text_key(c), ("prompt_embeds", "pooled"))]
            for caption in progress_bar(accelerator, "caching text embeddings")(todo):
                prompt_embeds, pooled = encode_prompts(models, [caption])
                data.cache.put("text", dataset.text_key(caption), {"prompt_embeds": prompt_embeds[0],
                                                                    "pooled": pooled[0]})
    # What the training step no longer needs leaves the accelerator (validation borrows it back).
    if args.cache_latents:
        models.vae.to("cpu")
    if args.cache_text_embeddings:
        models.text_encoder.to("cpu")
        models.text_encoder_2.to("cpu")


def progress_bar(accelerator, description):
    from tqdm.auto import tqdm

    return lambda items: tqdm(items, desc=description, disable=not accelerator.is_main_process, leave=False)


# ===================================================================================== the plan
def global_batches(data: TrainingData, processes: int) -> dict[int, int]:
    """Each dataset's global batch: its batch size on every process."""
    return {d: dataset.batch_size * processes for d, dataset in enumerate(data.datasets)}


def schedule_of(data: TrainingData, args, processes: int) -> tuple[int, int, int, int]:
    """(batches per epoch, optimizer updates per epoch, total updates, epochs)."""
    batches = len(loha_data.epoch_batches(data.samples, global_batches(data, processes), args.seed, 0))
    updates = math.ceil(batches / args.gradient_accumulation_steps)
    total = args.max_train_steps or args.num_train_epochs * updates
    return batches, updates, total, math.ceil(total / updates)


def print_plan(data: TrainingData, args, accelerator):
    """What the run will do, before anything loads: per folder its images, repeats and draws per epoch (the
    regularization images' after kohya's balance), the buckets with their counts, batches, epochs and steps."""
    if not accelerator.is_main_process:
        return
    batches, updates, total, epochs = schedule_of(data, args, accelerator.num_processes)
    folders, buckets = {}, {}
    for c in data.samples:
        subset = c.sample.subset
        row = folders.setdefault((c.sample.dataset, subset.name, subset.is_reg, subset.num_repeats), [0, 0])
        row[0] += 1
        row[1] += c.draws
        buckets[c.bucket] = buckets.get(c.bucket, 0) + c.draws
    train = sum(c.draws for c in data.samples if not c.sample.subset.is_reg)
    reg = sum(c.draws for c in data.samples if c.sample.subset.is_reg)
    lines = [f"plan: {sum(1 for c in data.samples if not c.sample.subset.is_reg)} training images, {train} draws "
             f"per epoch" + (f"; {reg} regularization draws per epoch (loss weight {args.prior_loss_weight:g})"
                             if reg else "")]
    for (d, name, is_reg, repeats), (images, draws) in folders.items():
        what = "regularization" if is_reg else "training"
        lines.append(f"  {name}: {images} {what} images x {repeats} repeats = {draws} draws per epoch"
                     + (f" (dataset {d + 1}: {data.datasets[d].resolution}px, batch {data.datasets[d].batch_size})"
                        if len(data.datasets) > 1 else ""))
    lines += ["  buckets (width x height: draws per epoch): "
              + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(buckets.items())),
              f"  {batches} batches per epoch on {accelerator.num_processes} process(es), {updates} updates per epoch "
              f"(accumulating {args.gradient_accumulation_steps}); {epochs} epochs, {total} steps"]
    if data.validation:
        source = (f"held out by --validation_split {args.validation_split}" if args.validation_split else
                  f"from --validation_data_dir {args.validation_data_dir}")
        lines.append(f"  validation: {len(data.validation)} images {source}, each at "
                     f"{loha_data.VALIDATION_TIMESTEPS} fixed timesteps, every "
                     f"{args.validation_steps} steps")
    print("\n".join(lines), file=sys.stderr, flush=True)


def largest_bucket(data: TrainingData) -> tuple[int, int]:
    return max((s.bucket for s in data.samples), key=lambda b: (b[0] * b[1], b))


def dry_run(args) -> int:
    """--dry_run: the plan and the estimated peak GPU memory, from the model's configs; no weight is read and
    nothing is written (the feature cache and the output folder are not touched)."""
    stub = SimpleNamespace(is_main_process=True, num_processes=int(os.environ.get("WORLD_SIZE", 1)))
    data = load_training_data(args, stub)
    if args.demo:  # the demo's base model is built here, as a hub model is downloaded
        from loha.tiny_sdxl import build_tiny_sdxl_pipeline
        build_tiny_sdxl_pipeline(args.pretrained_model_name_or_path)
    print_plan(data, args, stub)
    estimate = estimate_peak(args, data, mixed_precision_of(args))
    print(describe_estimate(estimate, args, data))
    cards = [gib for gib in (8, 12, 16, 24, 48, 80) if fits(estimate["bytes"], gib * 2**30)]
    print(f"fits a GPU with {cards[0]} GB or more" if cards else "fits none of the usual GPU sizes (80 GB or less)")
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        print(f"this machine's GPU has {free / 2**30:.1f} GiB free: it "
              f"{'fits' if fits(estimate['bytes'], free) else 'does not fit'}")
    return 0


def mixed_precision_of(args) -> str:
    """The mixed precision a run would use: the flag, else accelerate's (from `accelerate launch` or its config)."""
    if args.mixed_precision:
        return args.mixed_precision
    value = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if value is None:
        try:
            from accelerate.commands.config.config_args import default_config_file, load_config_from_file

            value = load_config_from_file(default_config_file).mixed_precision if Path(default_config_file).is_file() \
                else None
        except Exception:  # noqa: BLE001 - a broken accelerate config is accelerate's to report, at launch
            value = None
    return str(value or "no")


def fits(peak_bytes: int, free_bytes: int) -> bool:
    """Whether a counted peak fits, with what the count cannot see (CUDA workspaces, allocator rounding) added."""
    return peak_bytes + loha.memory.GPU_OVERHEAD_BYTES <= free_bytes


def describe_estimate(estimate: dict, args, data: TrainingData) -> str:
    w, h = estimate["bucket"]
    precision = PRECISION_NAMES.get(estimate["precision"], estimate["precision"])
    split = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in estimate["split"].items() if v)
    return (f"estimated peak GPU memory: {estimate['bytes'] / 2**30:.2f} GiB ({split}; plus about "
            f"{loha.memory.GPU_OVERHEAD_BYTES / 2**30:.1f} GiB of CUDA workspaces) for a step at the largest bucket "
            f"{w}x{h}, batch {estimate['batch']}, {precision}, "
            f"base weights {'fp8' if args.base_precision == 'fp8' else 'in the compute dtype'}, "
            f"{args.preset or (args.target_modules and 'custom targets') or loha.DEFAULT_PRESET} rank {args.rank}, "
            f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, latents "
            f"{'cached' if args.cache_latents else 'encoded each step'}, text "
            f"{'cached' if args.cache_text_embeddings else 'encoded each step'}")


PRECISION_NAMES = {"no": "fp32 (no mixed precision)", "bf16": "bf16 mixed precision", "fp16": "fp16 mixed precision"}


def check_fit(data: TrainingData, args, accelerator):
    """On a CUDA device: the estimate, and if it exceeds the device's free memory a warning naming flags that
    would make the run fit."""
    if accelerator.device.type != "cuda" or not accelerator.is_main_process:
        return
    estimate = estimate_peak(args, data, accelerator.mixed_precision)
    print(describe_estimate(estimate, args, data), file=sys.stderr, flush=True)
    free, _ = torch.cuda.mem_get_info(accelerator.device)
    if fits(estimate["bytes"], free):
        return
    changed, tried = argparse.Namespace(**vars(args)), []
    for flag, change in (("--gradient_checkpointing", {"gradient_checkpointing": True}),
                         ("--cache_latents", {"cache_latents": True}),
                         ("--base_precision fp8", {"base_precision": "fp8"})):
        if all(getattr(changed, k) == v for k, v in change.items()):
            continue
        vars(changed).update(change)
        tried.append(flag)
        smaller = estimate_peak(changed, data, accelerator.mixed_precision)
        if fits(smaller["bytes"], free):
            break
    else:
        while changed.train_batch_size > 1 and not fits(smaller["bytes"], free):
            changed.train_batch_size //= 2
            changed.gradient_accumulation_steps *= 2
            smaller = estimate_peak(changed, data, accelerator.mixed_precision)
        tried += [f"--train_batch_size {changed.train_batch_size}",
                  f"--gradient_accumulation_steps {changed.gradient_accumulation_steps}"]
    advice = (f"{' '.join(tried)} would fit it (estimated {smaller['bytes'] / 2**30:.2f} GiB)"
              if fits(smaller["bytes"], free) else f"even {' '.join(tried)} would not (estimated "
              f"{smaller['bytes'] / 2**30:.2f} GiB): use a GPU with more memory")
    overhead = loha.memory.GPU_OVERHEAD_BYTES / 2**30
    print(f"warning: the estimated peak of {estimate['bytes'] / 2**30:.2f} GiB (+{overhead:.1f} GiB of CUDA "
          f"workspaces) exceeds the {free / 2**30:.1f} GiB free on {accelerator.device}; {advice}",
          file=sys.stderr, flush=True)


ESTIMATE_FLAGS = ("preset", "target_modules", "rank", "alpha", "conv_rank", "conv_alpha", "use_tucker",
                  "loha_forward_mode", "train_text_encoder", "gradient_checkpointing", "cache_latents",
                  "cache_text_embeddings", "base_precision", "train_batch_size", "pretrained_vae_model_name_or_path",
                  "rank_dropout", "module_dropout", "snr_gamma", "prediction_type", "masked_loss", "optimizer",
                  "optimizer_args", "use_ema", "scale_weight_norms", "unet_lr", "text_encoder_lr", "loss_type",
                  "debiased_estimation_loss", "ip_noise_gamma", "network_weights", "dim_from_weights")


def estimate_args(args):
    """The flags the estimate injects with. A starting LoHa's values do not change the peak; with
    --dim_from_weights its shape does, taken from the file's recorded settings (kohya's ss_network_dim,
    ss_network_alpha and ss_network_args), else its most common rank."""
    fake = argparse.Namespace(**vars(args))
    fake.network_weights, fake.dim_from_weights = None, False
    if not args.dim_from_weights:
        return fake
    adapter = loha.read_adapter(args.network_weights)
    meta = adapter.metadata
    try:
        network = json.loads(meta.get("ss_network_args") or "{}")
    except ValueError:
        network = {}
    ranks = [mw.rank for modules in adapter.components.values() for mw in modules.values() if mw.factors]
    fake.rank = int(meta.get("ss_network_dim") or max(set(ranks), key=ranks.count))
    fake.alpha = float(meta.get("ss_network_alpha") or fake.rank)
    fake.conv_rank = int(network["conv_dim"]) if "conv_dim" in network else None
    fake.conv_alpha = float(network["conv_alpha"]) if "conv_alpha" in network else None
    fake.use_tucker = str(network.get("use_tucker")) == "True"
    fake.preset = network.get("preset") if network.get("preset") in loha.PRESETS else None
    fake.target_modules = None
    return fake


def estimate_peak(args, data: TrainingData, mixed_precision: str) -> dict:
    """The peak device memory of this run's training step at its largest bucket: the trainer's own step
    (training_loss, backward, clipping, the optimizer) run on fake tensors built from the model's configs, by a
    GPU's rules (loha.memory). Cached by configuration: a first estimate of SDXL takes tens of seconds of CPU."""
    source = base_source(args)
    configs = loha_sources.component_configs(source)
    bucket = (largest_bucket(data), max(d.batch_size for d in data.datasets))  # an upper bound with several datasets
    settings = {k: getattr(args, k) for k in ESTIMATE_FLAGS}
    key = loha_data.content_key("estimate", bucket, mixed_precision, settings, loha.__version__, torch.__version__,
                                {k: v if isinstance(v, dict) else v.to_dict() for k, v in configs.items()})
    cache = Path(args.feature_cache_dir) / "estimates" / f"{key}.json"
    if cache.is_file():
        try:
            return json.loads(cache.read_text())
        except (OSError, ValueError):
            pass
    peak = fake_step_peak(estimate_args(args), configs, source, bucket, mixed_precision)
    result = {**peak.as_dict(), "bucket": list(bucket[0]), "batch": bucket[1], "precision": mixed_precision}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        loha.atomic_write_bytes(cache, json.dumps(result).encode())
    except OSError:
        pass  # a read-only cache only costs the next estimate its time
    return result


def fake_step_peak(args, configs: dict, source, bucket, mixed_precision: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from loha import internals

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    vae_dtype = weight_dtype if args.pretrained_vae_model_name_or_path else torch.float32
    (w, h), batch_size = bucket
    with contextlib.ExitStack() as stack:
        stack.enter_context(internals.fake_mode())
        stack.enter_context(loha.memory.fake_moves())
        stack.enter_context(loha.memory.cuda_rules())
        make = loha.memory.fake_model
        unet = make(lambda: UNet2DConditionModel.from_config(configs["unet"]), weight_dtype)
        encoders = [make(lambda c=configs[k], m=m: m(c), weight_dtype) for k, m in
                    (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection))]
        vae = make(lambda: AutoencoderKL.from_config(configs["vae"]), vae_dtype)
        noise, sampling = make_schedulers(configs["scheduler"], args)
        tokenizers = [None, None]
        if not args.cache_text_embeddings:
            from transformers import AutoTokenizer

            tokenizers = [AutoTokenizer.from_pretrained(source.configs, subfolder=sub, **source.hub)
                          for sub in ("tokenizer", "tokenizer_2")]
        if args.base_precision == "fp8":
            loha_fp8.store_fp8(unet.requires_grad_(False))
        for model in (unet, vae, *encoders):
            model.requires_grad_(False)
        models = Models(*tokenizers, *encoders, vae, unet, noise, sampling, weight_dtype, "", "")
        add_adapters(models, args)
        trained = trained_models(models, args)
        params = [p for model in trained.values() for p in loha.trainable_parameters(model)]
        if loha_opt.OPTIMIZERS[args.optimizer][3]:  # their steps read scalars: their state is counted instead
            views = loha_opt.LayerViews([{"models": [m]} for m in trained.values()])
            optimizer = loha.memory.StandInOptimizer([p for g in views.groups for p in g["params"]], args.optimizer,
                                                     loha_opt.parse_args(args.optimizer_args))
        else:
            optimizer, views = make_optimizer(trained, args)
        ema = loha_ema.FactorEMA(params, args.ema_decay) if args.use_ema else None
        for model in trained.values():
            model.train()
            autocast_forward(model, weight_dtype)
        batch = {"index": list(range(batch_size)), "epoch": [0] * batch_size, "draw": [0] * batch_size,
                 "loss_weight": [1.0] * batch_size, "time_ids": torch.zeros(batch_size, 6)}
        if args.masked_loss:
            batch["mask"] = torch.ones(batch_size, 1, h // 8, w // 8)
        if args.cache_latents:
            batch["latent_params"] = torch.zeros(batch_size, 2 * configs["vae"]["latent_channels"], h // 8, w // 8)
        else:
            batch["pixels"] = torch.zeros(batch_size, 3, h, w)
        if args.cache_text_embeddings:
            batch["prompt_embeds"] = torch.zeros(batch_size, 77, configs["unet"]["cross_attention_dim"])
            batch["pooled"] = torch.zeros(batch_size, configs["text_encoder_2"].projection_dim)
        else:
            batch["caption"] = ["a photo"] * batch_size
        run = SimpleNamespace(models=models, accelerator=SimpleNamespace(device=torch.device("cpu")), trained=trained,
                              unet=unet, views=views, params=params, optimizer=optimizer, ema=ema, max_norm=None)
        resident = [unet] + ([] if args.cache_latents else [vae]) + ([] if args.cache_text_embeddings else encoders)

        def step(tracker):
            tracker.phase = "activations"
            loss = training_loss(run, args, batch)
            tracker.phase = "temporaries"
            loss.backward()
            tracker.phase = "optimizer"
            apply_update(run, args, torch.nn.utils.clip_grad_norm_)
            clear_gradients(run)

        return loha.memory.step_peak(resident, params, optimizer, step, batch)


def autocast_forward(model, dtype):
    """What accelerate's mixed precision does to a prepared model: its forward under autocast, outputs in fp32."""
    forward = model.forward

    def wrapped(*args, **kwargs):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = forward(*args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.float() if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in out)
        return out

    model.forward = wrapped


# ================================================================================== prepare/resume
@dataclasses.dataclass
class Run:
    accelerator: object
    models: Models
    data: TrainingData
    trained: dict  # component name -> prepared (maybe DDP-wrapped) model
    optimizer: object
    lr_scheduler: object
    batches_per_epoch: int
    updates_per_epoch: int
    max_train_steps: int
    num_epochs: int
    params: list  # the LoHa factors being trained, as stored (stacked in grouped mode)
    unet: torch.nn.Module  # what the step calls: prepared (DDP), compiled, or the frozen UNet itself
    views: loha_opt.LayerViews | None = None  # the per-layer tensors an optimizer steps on, if it needs them
    ema: loha_ema.FactorEMA | None = None
    global_step: int = 0
    skipped_updates: int = 0
    last_checkpoint: Path | None = None
    last_grid: Path | None = None
    last_validated_step: int | None = None
    last_loss: float = float("nan")
    images_seen: int = 0
    train_seconds: float = 0.0
    adapted: int = 0  # UNet modules with an adapter
    first_step: int = 0  # where this invocation started (after a resume: the checkpoint's step)
    losses: list = dataclasses.field(default_factory=list)  # (step, training loss), the whole run's
    validation_losses: list = dataclasses.field(default_factory=list)  # (step, validation loss)
    last_sampled_step: int | None = None
    max_norm: tuple | None = None  # (modules scaled, norms after) of the last update's max-norm, on the device


def prepare_training(models: Models, data: TrainingData, args, accelerator) -> Run:
    """Optimizer (a param group per trained part, with its learning rate), schedule and step counts; wrap for DDP;
    register adapter-only checkpoint hooks."""
    global_batch = args.train_batch_size * accelerator.num_processes
    batches_per_epoch, updates_per_epoch, max_train_steps, num_epochs = schedule_of(data, args,
                                                                                  accelerator.num_processes)
    timestep_range(args, models.noise_scheduler)  # a bad --min/--max_timestep fails before the first step

    trained = trained_models(models, args)
    scale = args.gradient_accumulation_steps * global_batch if args.scale_lr else 1
    optimizer, views = make_optimizer(trained, args, scale)
    lr_scheduler = loha_opt.make_schedule(args.lr_scheduler, optimizer, warmup_steps=args.lr_warmup_steps,
                                          total_steps=max_train_steps, num_cycles=args.lr_num_cycles,
                                          power=args.lr_power, step_rules=args.lr_step_rules,
                                          initial_lr=args.learning_rate * scale)
    params = [p for model in trained.values() for p in loha.trainable_parameters(model)]
    names = list(trained)
    prepared = accelerator.prepare(*trained.values(), optimizer, lr_scheduler)
    trained = dict(zip(names, prepared[:len(names)]))
    optimizer, lr_scheduler = prepared[len(names):]
    unet = trained.get("unet", models.unet)
    if args.compile:
        # Static shapes: one graph per bucket shape (and with reduce-overhead one CUDA graph each), so the
        # cache must hold them all.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        unet = torch.compile(unet, mode=None if args.compile_mode == "default" else args.compile_mode,
                             backend=args.compile_backend, dynamic=False)
    run = Run(accelerator, models, data, trained, optimizer, lr_scheduler, batches_per_epoch, updates_per_epoch,
              max_train_steps, num_epochs, params, unet, views, adapted=len(loha.adapter_modules(models.unet)))
    if args.use_ema:
        run.ema = loha_ema.FactorEMA(params, args.ema_decay)
    register_checkpoint_hooks(run, args)
    return run


def make_optimizer(trained: dict, args, scale: float = 1.0):
    """--optimizer on a param group per trained part at its learning rate; (optimizer, LayerViews or None)."""
    rates = part_learning_rates(args)
    groups = [{"models": [model], "lr": rates[part] * scale} for part, model in trained.items()]
    options = loha_opt.parse_args(args.optimizer_args)
    if args.optimizer in loha_opt.ADAM_FAMILY:
        options = dict(betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                       eps=args.adam_epsilon, **options)
    return loha_opt.make(args.optimizer, groups, options)


def start_logging(run: Run, args):
    """Trackers start only once a resume has been accepted: a refused run writes no event file."""
    if run.accelerator.is_main_process and args.report_to != "none":
        run.accelerator.init_trackers("loha-sdxl", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                           for k, v in settings(args).items()})


def register_checkpoint_hooks(run: Run, args):
    """accelerate's save/load_state write optimizer, scheduler, RNG and scaler; the models go through
    these hooks, which store the adapters only (a PEFT LoHa folder per component), never frozen weights."""
    accelerator = run.accelerator

    def bare(model):  # without DDP and torch.compile wrappers: the hooks get the model without the latter
        return accelerator.unwrap_model(model, keep_torch_compile=False)

    def component_of(model):
        return next(name for name, m in run.trained.items() if bare(m) is bare(model))

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                loha.save(bare(model), Path(output_dir) / component_of(model), base_model=recorded_base(args))
        weights.clear()  # nothing else of the models is written

    def load_hook(models, input_dir):
        while models:
            model = models.pop()
            loha.load(bare(model), Path(input_dir) / component_of(model))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. A checkpoint is only ever renamed into place once it is
    complete, so a partial one never has a checkpoint-N name."""
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if m and (path / STATE_FILE).is_file():
            found.append((int(m[1]), path))
    return sorted(found)


# What a resumed run may change. FIXED flags define what the saved steps already did (data, model, adapter,
# optimizer, schedule, batch, seed, precision): a new value is refused. ADJUSTABLE ones change only what
# happens from the resume on: a new value is applied and recorded with the step it applies from. The rest
# are not part of a run (where it is, how it was started). Every flag is in exactly one of the three.
RESUME_FIXED = {
    "pretrained_model_name_or_path", "pretrained_vae_model_name_or_path", "revision", "variant", "dataset_name",
    "dataset_config_name", "train_data_dir", "image_column", "caption_column", "caption_extension",
    "max_train_samples", "resolution", "center_crop", "random_flip", "enable_bucket", "caption_dropout",
    "reg_data_dir", "prior_loss_weight", "dataset_config", "shuffle_caption", "keep_tokens", "keep_tokens_separator",
    "caption_separator", "caption_tag_dropout_rate", "caption_prefix", "caption_suffix", "caption_variants",
    "masked_loss", "mask_data_dir", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "config",
    "zero_terminal_snr",
    "cache_latents", "preset", "target_modules", "rank", "alpha", "conv_rank", "conv_alpha", "use_tucker",
    "rank_dropout", "module_dropout", "loha_forward_mode", "train_text_encoder", "prediction_type", "snr_gamma",
    "noise_offset", "train_batch_size", "gradient_accumulation_steps", "learning_rate", "scale_lr", "lr_scheduler",
    "lr_warmup_steps", "lr_num_cycles", "lr_power", "adam_beta1", "adam_beta2", "adam_weight_decay",
    "adam_epsilon", "mixed_precision", "seed", "num_processes", "validation_split", "network_weights",
    "dim_from_weights", "min_timestep", "max_timestep", "loss_type", "huber_c", "huber_schedule", "huber_scale",
    "debiased_estimation_loss", "ip_noise_gamma", "ip_noise_gamma_random_strength", "unet_lr", "text_encoder_lr",
    "optimizer", "optimizer_args", "lr_step_rules", "scale_weight_norms", "use_ema", "ema_decay"}
RESUME_ADJUSTABLE = {
    "base_precision", "max_train_steps", "num_train_epochs", "max_grad_norm", "gradient_checkpointing", "allow_tf32",
    "compile",
    "compile_mode", "compile_backend", "cache_text_embeddings", "feature_cache_dir", "dataloader_num_workers",
    "checkpointing_steps", "checkpoints_total_limit", "validation_prompt", "num_validation_images",
    "validation_steps", "num_validation_inference_steps", "report_to", "logging_dir", "output_name",
    "kohya_naming", "validation_data_dir", "save_precision", "save_every_n_epochs", "save_last_n_epochs",
    "sample_prompts", "sample_every_n_steps", "sample_every_n_epochs", "sample_sampler", "sample_at_first"}
NOT_RECORDED = {"resume_from_checkpoint", "output_dir", "demo", "demo_model_dir", "cache_dir", "dry_run"}
RUN_ARGS = "run_args.json"  # the run's flags, in every checkpoint: what a resume is checked against
LOSSES_FILE = "losses.json"  # the run's losses so far, in every checkpoint: loss.png covers resumed runs whole
CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")


def settings(args) -> dict:
    """The run's flags as recorded (JSON), with the flag changes made on resumes."""
    out = {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()
           if k not in ("run_logging_dir", "flag_history")}
    out["flag_history"] = getattr(args, "flag_history", [])
    return out


def explicit_flags(argv) -> set[str]:
    """The flags given on this command line (not taken from a default)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


@dataclasses.dataclass
class ResumePlan:
    path: Path
    step: int
    factor_storage: str


def plan_resume(args, argv, accelerator) -> ResumePlan | None:
    """Choose and check the checkpoint before anything loads: its step and files are sound, its factor
    layout fits this run, and every flag either matches the saved run, is taken from it (not given here),
    is applied from this step on (and recorded), or is refused."""
    args.flag_history = []
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(args.output_dir)
        if not checkpoints:
            say(accelerator, f"no checkpoint in {args.output_dir} yet; starting a new run")
            return None
        path = checkpoints[-1][1]
    else:
        path = Path(args.resume_from_checkpoint)
        if not (path / STATE_FILE).is_file():
            raise LoHaError(f"--resume_from_checkpoint {path}: "
                            + ("no such folder" if not path.exists() else f"not a checkpoint (no {STATE_FILE})"))
    state = read_state(path)
    check_random_states(path, accelerator)
    stored = state.get("factor_storage", "per-layer")  # checkpoints from before stacking: per-layer
    saved_file = path / RUN_ARGS
    if saved_file.is_file():
        saved = read_json(saved_file, dict)
        args.num_processes = accelerator.num_processes  # compared like a flag: the global batch depends on it
        adopted, history = loha_runs.reconcile_flags(saved, args, explicit_flags(argv), RESUME_FIXED,
                                                     RESUME_ADJUSTABLE, state["global_step"], path.name)
        del args.num_processes
        length = {h["flag"] for h in history} & {"max_train_steps", "num_train_epochs"}
        if length and args.lr_scheduler not in CONSTANT_SCHEDULES:
            flag = sorted(length)[0]
            raise LoHaError(f"--{flag} changes the length of the {args.lr_scheduler} schedule {path.name} is part of, "
                            f"so the steps already taken would have had other learning rates; keep --{flag} "
                            f"{saved.get(flag)}, or start a new run")
        check_args(args)
        args.flag_history = list(saved.get("flag_history", [])) + history
        if adopted:
            say(accelerator, f"resuming {path.name} with its own " + ", ".join(
                f"--{k} {v}" for k, v in adopted.items()) + " (not given here)")
        for h in history:
            say(accelerator, f"--{h['flag']} {h['value']} (was {h['was']}) applies from step {h['from_step']} on")
    else:
        say(accelerator, f"warning: {path.name} was written before checkpoints recorded their flags; the flags "
                         "of this run cannot be checked against it")
    if stored != factor_storage(args):
        raise LoHaError(f"cannot resume from {path}: its optimizer state is for {stored} LoHa factors, this "
                        f"run's for {factor_storage(args)}; resume it with --loha_forward_mode "
                        f"{'grouped' if stored == 'stacked' else 'merged or bypass'}")
    return ResumePlan(path, state["global_step"], stored)


def check_random_states(path: Path, accelerator):
    """accelerate's load_state skips a random-state file it cannot read (it only logs at INFO level) and
    the run would go on with other random draws; read it first, with the same safe loader."""
    from accelerate.utils import load

    file = path / f"random_states_{accelerator.process_index}.pkl"
    try:
        states = load(file)
        ok = isinstance(states, dict) and {"random_state", "numpy_random_seed", "torch_manual_seed"} <= set(states)
    except Exception as e:  # noqa: BLE001 - torch.load's errors for a damaged file have many types
        raise LoHaError(f"cannot resume from {path}: a state file is damaged ({file.name}: "
                        f"{loha_cli.first_line(e)[:200]})") from None
    if not ok:
        raise LoHaError(f"cannot resume from {path}: a state file is damaged ({file.name} holds no random states)")


def read_json(file: Path, kind: type):
    try:
        value = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = getattr(e, "strerror", None) or type(e).__name__
        raise LoHaError(f"cannot resume: {file} is unreadable or not JSON ({reason})") from None
    if not isinstance(value, kind):
        raise LoHaError(f"cannot resume: {file} is not a JSON {'object' if kind is dict else kind.__name__}")
    return value


def read_state(path: Path) -> dict:
    """training_state.json, checked: a whole number of steps, the one the folder is named after."""
    state = read_json(path / STATE_FILE, dict)
    step = state.get("global_step")
    named = re.fullmatch(r"checkpoint-(\d+)", path.name)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise LoHaError(f"cannot resume: {path / STATE_FILE} has global_step {step!r}, not a whole number of steps "
                        "(the checkpoint is damaged or was edited)")
    if named is None or int(named[1]) != step:
        raise LoHaError(f"cannot resume: {path / STATE_FILE} says step {step}, but the folder is named {path.name} "
                        "(the checkpoint is damaged or was edited)")
    if state.get("factor_storage", "per-layer") not in ("per-layer", "stacked"):
        raise LoHaError(f"cannot resume: {path / STATE_FILE} has an unknown factor_storage "
                        f"{state['factor_storage']!r}")
    return state


def resume_from_checkpoint(run: Run, args, plan: ResumePlan | None):
    """Load the planned checkpoint's optimizer, scheduler, RNG and adapters; its scheduler must be at the
    step its state file says."""
    if plan is None:
        return
    try:
        run.accelerator.load_state(str(plan.path))
    except Exception as e:  # noqa: BLE001 - a damaged file fails in torch.load, pickle or safetensors alike
        raise LoHaError(f"cannot resume from {plan.path}: a state file is damaged "
                        f"({loha_cli.first_line(e)[:200]})") from None
    scheduled = getattr(run.lr_scheduler, "scheduler", run.lr_scheduler).last_epoch
    if scheduled != plan.step:
        raise LoHaError(f"cannot resume from {plan.path}: {STATE_FILE} says step {plan.step} but its scheduler "
                        f"state is at step {scheduled} (the checkpoint is damaged or was edited)")
    if run.ema is not None:
        run.ema.load(plan.path)
    if (plan.path / LOSSES_FILE).is_file():
        losses = read_json(plan.path / LOSSES_FILE, dict)
        run.losses = [tuple(x) for x in losses.get("train", []) if x[0] <= plan.step]
        run.validation_losses = [tuple(x) for x in losses.get("validation", []) if x[0] <= plan.step]
    run.global_step = plan.step
    run.last_checkpoint = plan.path
    log(run, f"resumed from {plan.path} at step {run.global_step}")


def say(accelerator, message: str):
    if accelerator.is_main_process:
        print(message, file=sys.stderr, flush=True)


def factor_storage(args) -> str:
    """How the UNet's factors are laid out for the optimizer (its state must match on resume)."""
    return "stacked" if args.loha_forward_mode == "grouped" else "per-layer"


def log(run: Run, message: str):
    if run.accelerator.is_main_process:
        from tqdm.auto import tqdm
        tqdm.write(message, file=sys.stderr)  # beside the progress bar, not into piped results


# =========================================================================================== train
def train(run: Run, args):
    """The loop: windows of --gradient_accumulation_steps batches, one optimizer update each."""
    from tqdm.auto import tqdm

    accelerator = run.accelerator
    nonfinite_streak = 0
    run.first_step = run.global_step
    for model in run.trained.values():
        model.train()
    last = lambda name: (f"{name} again: stopped at once; the last checkpoint is "
                         f"{run.last_checkpoint or 'none'}")
    with tqdm(total=run.max_train_steps, initial=run.global_step, desc="training", unit="step",
              disable=not accelerator.is_main_process) as bar, loha_runs.GracefulStop(last) as stop:
        started = time.perf_counter()
        for batches in remaining_windows(run, args):
            ok, loss = train_one_update(run, args, batches)
            run.images_seen += sum(len(b["index"]) for b in batches) * accelerator.num_processes
            run.global_step += 1
            nonfinite_streak = 0 if ok else nonfinite_streak + 1
            if ok:
                run.last_loss = loss
            else:
                run.skipped_updates += 1
                log(run, f"warning: step {run.global_step}: loss is NaN/Inf; update skipped "
                         f"({run.skipped_updates} so far)")
                if nonfinite_streak >= NONFINITE_STREAK_LIMIT:
                    bar.close()
                    raise LoHaError(f"loss was NaN/Inf for {NONFINITE_STREAK_LIMIT} updates in a row (up to step "
                                    f"{run.global_step}); stopped. Last good checkpoint: "
                                    f"{run.last_checkpoint or 'none'}. Try a lower --learning_rate")
            lrs = run.lr_scheduler.get_last_lr()
            bar.update(1)
            bar.set_postfix(loss=f"{run.last_loss:.4f}", lr=f"{lrs[0]:.2e}")
            run.losses.append((run.global_step, loss))
            logged = {"loss": run.last_loss, "lr": lrs[0]}
            if run.max_norm is not None:
                scaled, norms = run.max_norm
                logged.update({"max_norm/keys_scaled": int(scaled), "max_norm/average_key_norm": norms.mean().item(),
                               "max_norm/max_key_norm": norms.max().item()})
            if len(lrs) > 1:
                logged.update({f"lr/{part}": lr for part, lr in zip(run.trained, lrs)})
            accelerator.log(logged, step=run.global_step)
            run.train_seconds += time.perf_counter() - started  # data loading included, saving excluded
            epoch_end = run.global_step % run.updates_per_epoch == 0 and run.global_step < run.max_train_steps
            epoch = run.global_step // run.updates_per_epoch
            if run.global_step % args.checkpointing_steps == 0 and nonfinite_streak == 0:
                save_checkpoint(run, args)  # never during a NaN/Inf streak: the last good one stays latest
            if epoch_end and args.save_every_n_epochs and epoch % args.save_every_n_epochs == 0:
                save_epoch_file(run, args, epoch)
            if run.global_step % args.validation_steps == 0:
                validate(run, args)
            if (args.sample_every_n_steps and run.global_step % args.sample_every_n_steps == 0) or (
                    epoch_end and args.sample_every_n_epochs and epoch % args.sample_every_n_epochs == 0):
                sample_prompts(run, args)
            if stop_requested(run, stop):
                bar.close()
                if run.last_checkpoint is None or run.last_checkpoint.name != f"checkpoint-{run.global_step}":
                    save_checkpoint(run, args)
                raise Interrupted(f"{stop.requested} at step {run.global_step}: saved {run.last_checkpoint}; "
                                  "resume with --resume_from_checkpoint latest", stop.exit_status)
            started = time.perf_counter()
    accelerator.wait_for_everyone()


def stop_requested(run: Run, stop) -> bool:
    """Whether any process got a stop signal: all of them stop after the same update."""
    flag = stop.requested is not None
    if run.accelerator.num_processes > 1:
        votes = run.accelerator.gather(torch.tensor([float(flag)], device=run.accelerator.device))
        if votes.max().item() > 0 and stop.requested is None:
            stop.requested = "SIGTERM"  # a sibling process was signalled
        return bool(votes.max().item() > 0)
    return flag


def remaining_windows(run: Run, args):
    """Loaded batches, one accumulation window at a time, from the current step (mid-epoch after a
    resume, via accelerate's skip_first_batches) up to --max_train_steps. One DataLoader per epoch, so
    its workers prefetch across updates."""
    first_epoch = run.global_step // run.updates_per_epoch
    for epoch in range(first_epoch, run.num_epochs):
        windows = epoch_windows(run, args, epoch)
        loader = torch.utils.data.DataLoader(
            run.data.dataset, batch_sampler=[batch for window in windows for batch in window], collate_fn=collate,
            num_workers=args.dataloader_num_workers,
            generator=loha_data.torch_generator_for(args.seed, epoch, "loader"))  # leaves the global RNG alone
        done_in_epoch = run.global_step - epoch * run.updates_per_epoch  # > 0 only when resuming mid-epoch
        if done_in_epoch:
            loader = run.accelerator.skip_first_batches(loader, sum(len(w) for w in windows[:done_in_epoch]))
        batches = iter(loader)
        for window in windows[done_in_epoch:]:
            if run.global_step >= run.max_train_steps:
                return
            yield [next(batches) for _ in window]


def epoch_windows(run: Run, args, epoch: int) -> list[list[list[tuple[int, int]]]]:
    """This process's batches for ``epoch``, grouped into accumulation windows; items are (position, epoch, draw)."""
    acc = run.accelerator
    batches = loha_data.epoch_batches(run.data.samples, global_batches(run.data, acc.num_processes), args.seed,
                                      epoch)
    mine = [[(pos, epoch, draw) for pos, draw in loha_data.share_of_batch(b, acc.process_index, acc.num_processes)]
            for b in batches]
    step = args.gradient_accumulation_steps
    return [mine[i:i + step] for i in range(0, len(mine), step)]


def train_one_update(run: Run, args, batches: list[dict]) -> tuple[bool, float]:
    """Forward/backward over an accumulation window's batches, then one optimizer step, unless any loss
    (on any process) is NaN/Inf: then the whole update is skipped and the optimizer state left untouched."""
    accelerator = run.accelerator
    finite, losses = True, []
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with contextlib.ExitStack() as stack:
            if not last:  # gradients are all-reduced once per update, on its last batch
                for model in run.trained.values():
                    stack.enter_context(accelerator.no_sync(model))
            loss = training_loss(run, args, batch)
            finite = finite and bool(accelerator.gather(torch.isfinite(loss.detach()).float()[None]).all())
            if finite:
                accelerator.backward(loss / len(batches))
                losses.append(loss.detach())
    if finite:
        apply_update(run, args, accelerator.clip_grad_norm_)
    run.lr_scheduler.step()
    clear_gradients(run)
    mean_loss = accelerator.gather(torch.stack(losses).mean()[None]).mean().item() if finite else float("nan")
    return finite, mean_loss


def apply_update(run, args, clip_grad_norm):
    """One optimizer update from the gradients a step left, as the training loop runs it and the memory
    estimate counts it: the per-layer views handed their slices of the stacks' gradients (before clipping),
    clipping, the step, max-norm (kohya's --scale_weight_norms) on the updated factors, then the EMA of the
    result. Max-norm's count and norms stay on the device until they are logged."""
    if run.views is not None:
        run.views.hand_gradients()
    if args.max_grad_norm > 0:
        clip_grad_norm(run.params, args.max_grad_norm)
    run.optimizer.step()
    if args.scale_weight_norms:  # DDP wrappers hold the same layers: loha finds them through named_modules
        results = [loha.scale_weight_norms(model, args.scale_weight_norms) for model in run.trained.values()]
        run.max_norm = (sum(n for n, _ in results), torch.cat([norms for _, norms in results]))
    if run.ema is not None:
        run.ema.step()


def clear_gradients(run):
    """The optimizer's gradients, and with per-layer views the stacks' too (the views' optimizer sees only its
    views)."""
    run.optimizer.zero_grad(set_to_none=True)
    if run.views is not None:
        run.views.clear_stack_gradients()


def timestep_range(args, scheduler) -> tuple[int, int]:
    """[low, high) of the timesteps drawn (--min_timestep / --max_timestep, kohya's rule: equal ends give that
    one timestep), checked against the scheduler's num_train_timesteps."""
    total = scheduler.config.num_train_timesteps
    low = args.min_timestep or 0
    high = total if args.max_timestep is None else args.max_timestep
    if high > total or low >= total:
        raise LoHaError(f"--min_timestep {low} / --max_timestep {high}: the scheduler has {total} timesteps "
                        f"(0 to {total - 1}); keep --max_timestep <= {total} and --min_timestep < {total}")
    return low, high


def draw_noise(args, batch, latent_shape, low: int, high: int):
    """Per sample, from a generator seeded by (seed, epoch, index, draw): timestep, noise, the latent's own
    sampling noise and (with --ip_noise_gamma) the input perturbation. Independent of batch size, process count
    and resume point. A batch's own ``timestep`` (the validation set's) replaces the drawn one."""
    timesteps, noise, latent_eps, perturbation = [], [], [], []
    fixed = batch.get("timestep", [None] * len(batch["index"]))
    for index, epoch, draw, t in zip(batch["index"], batch["epoch"], batch["draw"], fixed):
        g = loha_data.torch_generator_for(args.seed, epoch, index, draw, "noise")
        drawn = torch.randint(0, high - low, (), generator=g) + low if high > low else torch.tensor(low)
        timesteps.append(drawn if t is None else torch.tensor(t))
        n = torch.randn(latent_shape, generator=g)
        if args.noise_offset:  # a per-channel shift: lets the model learn very dark/bright images
            n = n + args.noise_offset * torch.randn(latent_shape[0], 1, 1, generator=g)
        noise.append(n)
        latent_eps.append(torch.randn(latent_shape, generator=g))
        if args.ip_noise_gamma:
            strength = args.ip_noise_gamma * (torch.rand((), generator=g) if args.ip_noise_gamma_random_strength
                                              else 1.0)
            perturbation.append(strength * torch.randn(latent_shape, generator=g))
    return (torch.stack(timesteps), torch.stack(noise), torch.stack(latent_eps),
            torch.stack(perturbation) if perturbation else None)


def training_loss(run: Run, args, batch) -> torch.Tensor:
    """The diffusion loss of one training batch (see ``batch_loss``)."""
    return batch_loss(run, args, batch, run.unet)


def batch_loss(run: Run, args, batch, unet) -> torch.Tensor:
    """The diffusion loss for one batch, in fp32: --loss_type per element (masked with --masked_loss), the mean
    per sample, weighted by min-SNR (--snr_gamma), debiased estimation and the regularization images' prior
    weight, then the batch mean."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.training_utils import compute_snr

    models, device = run.models, run.accelerator.device
    scheduler = models.noise_scheduler
    with torch.no_grad():
        params = batch["latent_params"] if "latent_params" in batch else encode_latent_distribution(
            models, batch["pixels"])
        posterior = DiagonalGaussianDistribution(params.float().to(device))  # no device->host round trip
    latent_shape = posterior.mean.shape[1:]
    drawn = draw_noise(args, batch, latent_shape, *timestep_range(args, scheduler))  # on the CPU: device-independent
    timesteps, noise, latent_eps = (t.to(device) for t in drawn[:3])
    latents = (posterior.mean + posterior.std * latent_eps) * models.vae.config.scaling_factor
    noisy = scheduler.add_noise(latents, noise if drawn[3] is None else noise + drawn[3].to(device), timesteps)
    if "prompt_embeds" in batch:
        prompt_embeds, pooled = batch["prompt_embeds"].to(device), batch["pooled"].to(device)
    else:
        with torch.set_grad_enabled(args.train_text_encoder and torch.is_grad_enabled()):
            prompt_embeds, pooled = encode_prompts(text_models(run), batch["caption"])
    dtype = models.weight_dtype
    prediction = unet(
        noisy.to(dtype), timesteps, prompt_embeds.to(dtype),
        added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": batch["time_ids"].to(device, dtype)},
        return_dict=False)[0]
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    threshold = None
    if args.loss_type in ("huber", "smooth_l1"):
        threshold = loha_losses.huber_threshold(args.huber_schedule, args.huber_c, args.huber_scale, timesteps,
                                                scheduler.alphas_cumprod, scheduler.config.num_train_timesteps)
    per_element = loha_losses.elementwise(prediction, target, args.loss_type, threshold)
    per_sample = masked_mean(per_element, batch["mask"].to(device)) if "mask" in batch else \
        per_element.mean(dim=(1, 2, 3))
    if args.snr_gamma is not None or args.debiased_estimation_loss:
        snr = compute_snr(scheduler, timesteps).float()
        if args.snr_gamma is not None:
            per_sample = per_sample * loha_losses.min_snr_weights(snr, args.snr_gamma, v_prediction)
        if args.debiased_estimation_loss:
            per_sample = per_sample * loha_losses.debiased_weights(snr, v_prediction)
    if "loss_weight" in batch:  # regularization images: --prior_loss_weight
        per_sample = per_sample * torch.tensor(batch["loss_weight"], device=device, dtype=per_sample.dtype)
    return per_sample.mean()


def masked_mean(per_element: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sample Σ loss·mask / (channels · Σ mask), the mask (B, 1, h, w) shared by the latent's channels; an
    all-black mask gives 0, and no gradient at all."""
    weight = mask.sum(dim=(1, 2, 3)) * per_element.shape[1]
    total = (per_element * mask).sum(dim=(1, 2, 3))
    return torch.where(weight > 0, total / weight.clamp_min(torch.finfo(weight.dtype).tiny), torch.zeros_like(total))


def text_models(run: Run) -> Models:
    """Models with the prepared (DDP-wrapped) text encoders when they train, so their gradients sync."""
    if "text_encoder" not in run.trained:
        return run.models
    return dataclasses.replace(run.models, text_encoder=run.trained["text_encoder"],
                               text_encoder_2=run.trained["text_encoder_2"])


# ==================================================================================== checkpoints
def save_checkpoint(run: Run, args):
    """checkpoint-<step>/: accelerate state + adapters, written into a temp folder beside it, fsynced and
    renamed into place (loha.atomic_directory), so a crash never leaves a half checkpoint that looks
    complete. Then the oldest beyond --checkpoints_total_limit are removed."""
    from accelerate.utils import broadcast_object_list

    accelerator = run.accelerator
    final = Path(args.output_dir) / f"checkpoint-{run.global_step}"
    try:
        with contextlib.ExitStack() as stack:
            tmp = [str(stack.enter_context(loha.atomic_directory(final))) if accelerator.is_main_process else None]
            if accelerator.num_processes > 1:
                broadcast_object_list(tmp)
            accelerator.save_state(tmp[0])
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                recorded = {k: v for k, v in settings(args).items() if k not in NOT_RECORDED}
                recorded["num_processes"] = accelerator.num_processes
                (Path(tmp[0]) / RUN_ARGS).write_text(json.dumps(recorded, indent=2))
                (Path(tmp[0]) / LOSSES_FILE).write_text(json.dumps({"train": run.losses,
                                                                    "validation": run.validation_losses}))
                if run.ema is not None:
                    run.ema.save(Path(tmp[0]))
                (Path(tmp[0]) / STATE_FILE).write_text(json.dumps({"global_step": run.global_step,
                                                                   "factor_storage": factor_storage(args)}))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError, without errno
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (
            f"disk full? {shutil.disk_usage(args.output_dir).free / 2**20:.1f} MiB free "
            f"({loha_cli.first_line(e)})")
        raise LoHaError(f"could not write {final}: {reason}; the previous checkpoint "
                        f"({run.last_checkpoint or 'none'}) is intact") from None
    accelerator.wait_for_everyone()
    run.last_checkpoint = final
    if accelerator.is_main_process:
        export_file(run, args, step_file(args, run.global_step))
    if accelerator.is_main_process and args.checkpoints_total_limit:
        for step, old in list_checkpoints(args.output_dir)[:-args.checkpoints_total_limit]:
            # Out of sight first, then deleted: a kill during the delete leaves a hidden temp folder
            # (removed at the next start), never a torn folder still named checkpoint-N.
            doomed = old.with_name(f".{old.name}.tmp-pruned")
            os.replace(old, doomed)
            shutil.rmtree(doomed)
            step_file(args, step).unlink(missing_ok=True)  # its loadable file goes with it


def step_file(args, step: int) -> Path:
    """The loadable file written with checkpoint-<step>: kohya's name for step saves."""
    return Path(args.output_dir) / f"{args.output_name}-step{step:08d}.safetensors"


def save_epoch_file(run: Run, args, epoch: int):
    """<output_name>-<epoch:06d>.safetensors (kohya's name), keeping the newest --save_last_n_epochs."""
    if not run.accelerator.is_main_process:
        return
    export_file(run, args, Path(args.output_dir) / f"{args.output_name}-{epoch:06d}.safetensors")
    if args.save_last_n_epochs:
        pattern = re.compile(re.escape(args.output_name) + r"-(\d{6})\.safetensors")
        files = sorted((int(m[1]), f) for f in Path(args.output_dir).iterdir() if (m := pattern.fullmatch(f.name)))
        for _, old in files[:-args.save_last_n_epochs]:
            old.unlink(missing_ok=True)


SAVE_DTYPES = {"fp32": torch.float32, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def export_file(run: Run, args, file: Path, raw: bool = False):
    """The kohya/LyCORIS file of the adapters now (the EMA's with --use_ema, unless ``raw``), with the full
    metadata, in --save_precision, written atomically."""
    parts = adapted_models(run, args)
    with run.ema.swapped_in() if run.ema is not None and not raw else contextlib.nullcontext():
        try:
            loha.export_kohya(parts["unet"], file, text_encoder=parts.get("text_encoder"),
                              text_encoder_2=parts.get("text_encoder_2"), base_model=recorded_base(args),
                              naming=args.kohya_naming, dtype=SAVE_DTYPES[args.save_precision],
                              preset=args.preset or (None if args.target_modules else loha.DEFAULT_PRESET),
                              metadata=kohya_metadata(run, args))
        except OSError as e:
            raise LoHaError(f"could not write {file}: {e.strerror or e}; the latest checkpoint "
                            f"({run.last_checkpoint or 'none'}) is intact") from None


def remove_abandoned_checkpoints(output_dir):
    """Temp folders of checkpoint writes or deletes that were killed: never complete, never resumed."""
    for abandoned in Path(output_dir).glob(".checkpoint-*.tmp-*"):
        shutil.rmtree(abandoned, ignore_errors=True)


# ===================================================================================== validation
def validate(run: Run, args):
    """At the start, every --validation_steps and at the end: the validation loss (with a validation set) and
    images from the live adapter for each --validation_prompt, saved as a PNG grid and logged. With --use_ema
    both use the averaged adapter, the one the outputs hold."""
    if run.last_validated_step == run.global_step or not (args.validation_prompt or run.data.validation):
        return
    run.last_validated_step = run.global_step
    accelerator = run.accelerator
    if accelerator.is_main_process:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), \
                run.ema.swapped_in() if run.ema is not None else contextlib.nullcontext():
            if run.data.validation:
                value = validation_loss(run, args)
                run.validation_losses = [x for x in run.validation_losses if x[0] != run.global_step]
                run.validation_losses.append((run.global_step, value))
                accelerator.log({"validation_loss": value}, step=run.global_step)
                log(run, f"step {run.global_step}: validation loss {value:.5f} ({len(run.data.validation)} images x "
                         f"{len(run.data.validation_set.timesteps)} timesteps)")
            if args.validation_prompt:
                images = generate_validation_images(run, args)
                run.last_grid = save_grid(images, args, run.global_step)
                log_images(run, images, args)
    accelerator.wait_for_everyone()


def validation_loss(run: Run, args) -> float:
    """The mean loss over the validation set's fixed (image, timestep, noise) triples, in eval mode (no rank or
    module dropout): the same weights always give the same number."""
    dataset = run.data.validation_set
    models = adapted_models(run, args)
    for model in models.values():
        model.eval()
    try:
        text = ({"text_encoder": models["text_encoder"], "text_encoder_2": models["text_encoder_2"]}
                if "text_encoder" in models else {})
        bare = dataclasses.replace(run, trained=text)  # text_models() reads the encoders from here
        losses = [batch_loss(bare, args, collate([dataset[(pos, loha_data.VALIDATION_EPOCH, k)]]), models["unet"])
                  for pos in range(len(dataset)) for k in range(len(dataset.timesteps))]
    finally:
        for model in models.values():
            model.train()
    return torch.stack(losses).mean().item()


@contextlib.contextmanager
def sampling_pipeline(run: Run, args):
    """An SDXLPipeline on the live (unwrapped) models, in eval mode; the frozen parts the step does not need
    go back to the CPU after."""
    from diffusers import StableDiffusionXLPipeline

    models, device = run.models, run.accelerator.device
    parts = adapted_models(run, args)
    for model in (models.vae, models.text_encoder, models.text_encoder_2):
        model.to(device)
    pipe = StableDiffusionXLPipeline(
        vae=models.vae, text_encoder=parts.get("text_encoder", models.text_encoder),
        text_encoder_2=parts.get("text_encoder_2", models.text_encoder_2), tokenizer=models.tokenizer,
        tokenizer_2=models.tokenizer_2, unet=parts["unet"], scheduler=models.sampling_scheduler,
        add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    for model in parts.values():
        model.eval()
    try:
        with run.accelerator.autocast():
            yield pipe
    finally:
        for model in parts.values():
            model.train()
        if args.cache_latents:
            models.vae.to("cpu")
        if args.cache_text_embeddings:
            models.text_encoder.to("cpu")
            models.text_encoder_2.to("cpu")


def generate_validation_images(run: Run, args) -> list[list]:
    rows = []
    with sampling_pipeline(run, args) as pipe:
        for prompt in args.validation_prompt:
            generator = torch.Generator(device=run.accelerator.device).manual_seed(args.seed)
            rows.append(pipe(prompt, num_images_per_prompt=args.num_validation_images, generator=generator,
                             num_inference_steps=args.num_validation_inference_steps,
                             height=args.resolution, width=args.resolution).images)
    return rows


def sample_prompts(run: Run, args):
    """--sample_prompts' images of the adapter now (the EMA's with --use_ema): samples/step-<N>-<prompt>-seed<S>.png,
    each with infer.py's PNG parameters. A prompt whose latents turn NaN/Inf is reported and skipped."""
    if run.last_sampled_step == run.global_step:
        return
    run.last_sampled_step = run.global_step
    if run.accelerator.is_main_process:
        prompts = loha_sampling.read_prompts(args.sample_prompts)
        folder = Path(args.output_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]), torch.no_grad(), \
                run.ema.swapped_in() if run.ema is not None else contextlib.nullcontext(), \
                sampling_pipeline(run, args) as pipe:
            default_scheduler = pipe.scheduler  # the pipeline is made for these images only: no need to restore it
            for i, p in enumerate(progress_bar(run.accelerator, "sample prompts")(prompts)):
                sampler = p.sampler or args.sample_sampler
                pipe.scheduler = loha_sampling.make_scheduler(sampler, default_scheduler.config)
                params = {"prompt": p.prompt, "negative_prompt": p.negative_prompt,
                          "seed": args.seed if p.seed is None else p.seed, "steps": p.steps or 30,
                          "guidance_scale": 7.5 if p.guidance_scale is None else p.guidance_scale, "scheduler": sampler,
                          "width": p.width or args.resolution, "height": p.height or args.resolution,
                          "base_model": recorded_base(args), "checkpoint": f"{args.output_dir} step {run.global_step}"
                          + (" (EMA)" if run.ema is not None else ""), "scale": 1.0}
                try:
                    image = loha_sampling.render(pipe, p.prompt, p.negative_prompt, [params["seed"]],
                                                 steps=params["steps"], guidance=params["guidance_scale"],
                                                 height=params["height"], width=params["width"])[0]
                except loha_sampling.NonFiniteLatents as e:
                    log(run, f"warning: sample prompt {i} (line {p.line}) at step {run.global_step}: {e}; skipped")
                    continue
                buffer = io.BytesIO()
                image.save(buffer, format="PNG", pnginfo=loha_sampling.png_parameters(params))
                loha.atomic_write_bytes(folder / f"step-{run.global_step:06d}-{i:02d}-seed{params['seed']}.png",
                                        buffer.getvalue())
    run.accelerator.wait_for_everyone()


def save_grid(rows: list[list], args, step: int) -> Path:
    """One row per prompt; prompt and step go into the PNG's text chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    w, h = rows[0][0].size
    grid = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * w, y * h))
    info = PngInfo()
    info.add_text("prompt", "\n".join(args.validation_prompt))
    info.add_text("step", str(step))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG", pnginfo=info)
    file = Path(args.output_dir) / "samples" / f"step-{step}.png"
    file.parent.mkdir(parents=True, exist_ok=True)
    loha.atomic_write_bytes(file, buffer.getvalue())
    return file


def log_images(run: Run, rows, args):
    import numpy as np

    for tracker in run.accelerator.trackers:
        if tracker.name == "tensorboard":
            images = np.stack([np.asarray(image) for row in rows for image in row])
            tracker.writer.add_images("validation", images, run.global_step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb
            tracker.log({"validation": [wandb.Image(image, caption=prompt) for prompt, row in
                                        zip(args.validation_prompt, rows) for image in row]}, step=run.global_step)


# ======================================================================================== outputs
def save_final_outputs(run: Run, args):
    """unet/ (PEFT LoHa folder), <output_name>.safetensors (kohya), with --use_ema also the trained weights as
    <output_name>-raw.safetensors, training_args.json, README.md and loss.png; each written atomically. Then the
    last samples."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out, base = Path(args.output_dir), recorded_base(args)
        parts = adapted_models(run, args)
        kohya_file = out / f"{args.output_name}.safetensors"
        raw_file = out / f"{args.output_name}-raw.safetensors"
        for name in [*parts, kohya_file.name, raw_file.name, "training_args.json", "README.md", "loss.png"]:
            for abandoned in out.glob(f".{name}.tmp-*"):  # from a write that was killed
                if abandoned.is_dir():
                    shutil.rmtree(abandoned, ignore_errors=True)
                else:
                    abandoned.unlink(missing_ok=True)
        if run.ema is not None:
            export_file(run, args, raw_file, raw=True)
        export_file(run, args, kohya_file)
        try:
            with run.ema.swapped_in() if run.ema is not None else contextlib.nullcontext():
                for name, model in parts.items():
                    loha.save(model, out / name, base_model=base, dtype=SAVE_DTYPES[args.save_precision])
            loha.atomic_write_bytes(out / "training_args.json", json.dumps(settings(args), indent=2).encode())
            loha.atomic_write_bytes(out / "README.md", model_card(run, args).encode())
        except OSError as e:
            raise LoHaError(f"could not write the final outputs to {out}: {e.strerror or e}; the latest checkpoint "
                            f"({run.last_checkpoint or 'none'}) is intact") from None
    validate(run, args)  # the final adapter's images and validation loss (unless the last step just made them)
    if args.sample_prompts:
        sample_prompts(run, args)
    if accelerator.is_main_process:
        loha_plots.loss_plot(Path(args.output_dir) / "loss.png", run.losses, run.validation_losses,
                             title=f"{args.output_name}: {run.global_step} steps")


def kohya_metadata(run: Run, args) -> dict[str, str]:
    """The training metadata kohya writes (same keys, same value formats: str() of the value, JSON for the
    tables), which AUTOMATIC1111's and Forge's LoRA cards and civitai read; and the base model's provenance."""
    folders, reg_folders, captions = {}, {}, {}
    for c in run.data.samples:
        subset = c.sample.subset
        table = reg_folders if subset.is_reg else folders
        entry = table.setdefault(subset.name, {"n_repeats": subset.num_repeats, "img_count": 0})
        entry["img_count"] += 1
        caption = c.sample.caption
        captions.setdefault(subset.name, []).append(caption if isinstance(caption, str) else caption[0])
    first = run.data.datasets[0]
    optimizer = type(run.optimizer.optimizer if hasattr(run.optimizer, "optimizer") else run.optimizer)
    options = args.optimizer_args or []
    rates = part_learning_rates(args)
    text_lr = [rates["text_encoder"], rates["text_encoder_2"]] if args.train_text_encoder else None
    values = {
        "ss_output_name": args.output_name, "ss_learning_rate": args.learning_rate, "ss_unet_lr": rates["unet"],
        "ss_text_encoder_lr": text_lr if not text_lr or text_lr[0] != text_lr[1] else text_lr[0],
        "ss_num_train_images": sum(e["n_repeats"] * e["img_count"] for e in folders.values()),
        "ss_num_reg_images": sum(e["n_repeats"] * e["img_count"] for e in reg_folders.values()),
        "ss_num_batches_per_epoch": run.batches_per_epoch, "ss_num_epochs": run.num_epochs,
        "ss_steps": run.global_step, "ss_epoch": math.ceil(run.global_step / run.updates_per_epoch),
        "ss_max_train_steps": run.max_train_steps, "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps, "ss_lr_scheduler": args.lr_scheduler,
        "ss_lr_warmup_steps": args.lr_warmup_steps, "ss_mixed_precision": run.accelerator.mixed_precision,
        "ss_optimizer": f"{optimizer.__module__}.{optimizer.__name__}" + (f"({','.join(options)})" if options else ""),
        "ss_max_grad_norm": args.max_grad_norm, "ss_scale_weight_norms": args.scale_weight_norms,
        "ss_min_timestep": args.min_timestep, "ss_max_timestep": args.max_timestep, "ss_loss_type": args.loss_type,
        "ss_huber_schedule": args.huber_schedule, "ss_huber_c": args.huber_c, "ss_huber_scale": args.huber_scale,
        "ss_debiased_estimation": args.debiased_estimation_loss, "ss_ip_noise_gamma": args.ip_noise_gamma,
        "ss_ip_noise_gamma_random_strength": args.ip_noise_gamma_random_strength,
        "ss_num_validation_images": len(run.data.validation), "ss_validation_split": args.validation_split,
        "ss_validation_seed": args.seed if run.data.validation else None, "ss_ema_decay":
            args.ema_decay if args.use_ema else None,
        "ss_resolution": str((first.resolution, first.resolution)), "ss_seed": args.seed,
        "ss_batch_size_per_device": first.batch_size, "ss_cache_latents": args.cache_latents,
        "ss_enable_bucket": first.enable_bucket, "ss_min_bucket_reso": first.min_bucket_reso,
        "ss_max_bucket_reso": first.max_bucket_reso, "ss_shuffle_caption": args.shuffle_caption,
        "ss_keep_tokens": args.keep_tokens, "ss_caption_dropout_rate": args.caption_dropout,
        "ss_caption_tag_dropout_rate": args.caption_tag_dropout_rate, "ss_flip_aug": args.random_flip,
        "ss_prior_loss_weight": args.prior_loss_weight, "ss_min_snr_gamma": args.snr_gamma,
        "ss_noise_offset": args.noise_offset, "ss_zero_terminal_snr": args.zero_terminal_snr,
        "ss_fp8_base": args.base_precision == "fp8", "ss_training_comment": trigger_prompt(run, args),
        "ss_dataset_dirs": json.dumps(folders), "ss_reg_dataset_dirs": json.dumps(reg_folders),
        "ss_tag_frequency": json.dumps(loha_kohya.tag_frequency(captions)),
    }
    out = {k: str(v) for k, v in values.items()}
    out.update(loha_sources.provenance(recorded_base(args), args.pretrained_vae_model_name_or_path,
                                       args.feature_cache_dir))
    return out


def trigger_prompt(run: Run, args) -> str:
    if args.validation_prompt:
        return args.validation_prompt[0]
    caption = run.data.samples[0].sample.caption
    return caption if isinstance(caption, str) else caption[0]


def model_card(run: Run, args) -> str:
    base = args.pretrained_model_name_or_path
    conv = f"{args.conv_rank or args.rank} / {args.conv_alpha or args.alpha or args.conv_rank or args.rank}"
    rows = {"rank / alpha": f"{args.rank} / {args.alpha or args.rank}",
            "modules": f"--target_modules {args.target_modules}" if args.target_modules else
            f"preset {args.preset or loha.DEFAULT_PRESET} ({run.adapted} modules)",
            "conv rank / alpha (kernels > 1x1)": conv + (", Tucker" if args.use_tucker else ""),
            "text encoders trained": args.train_text_encoder, "resolution": args.resolution,
            "aspect buckets": args.enable_bucket, "steps": run.global_step,
            "batch size (per device x processes x accumulation)":
                f"{args.train_batch_size} x {run.accelerator.num_processes} x {args.gradient_accumulation_steps}",
            "learning rate / schedule": f"{args.learning_rate} / {args.lr_scheduler}",
            "learning rate per part": ", ".join(f"{part} {lr:g}" for part, lr in part_learning_rates(args).items()),
            "optimizer": " ".join([args.optimizer, *(args.optimizer_args or [])]),
            "loss": args.loss_type + (f" (huber_c {args.huber_c}, {args.huber_schedule} schedule)"
                                      if args.huber_c else "") + (f", min-SNR gamma {args.snr_gamma}"
                                                                  if args.snr_gamma else "")
            + (", debiased estimation" if args.debiased_estimation_loss else ""),
            "EMA": f"decay {args.ema_decay} (the files hold the average)" if args.use_ema else "no",
            "started from": args.network_weights or "a new adapter",
            "mixed precision": run.accelerator.mixed_precision, "seed": args.seed,
            "training images": len(run.data.samples)}
    if getattr(args, "flag_history", None):
        rows["changed on resume"] = "; ".join(f"from step {h['from_step']}: --{h['flag']} {h['value']} (was {h['was']})"
                                              for h in args.flag_history)
    table = "\n".join(f"| {k} | {v} |" for k, v in rows.items())
    return f"""---
base_model: {base}
library_name: diffusers
tags: [stable-diffusion-xl, text-to-image, loha, lycoris]
---
# LoHa adapter for {base}

Trigger prompt: `{trigger_prompt(run, args)}`

| setting | value |
|---|---|
{table}

## Use it
- diffusers + this kit: `loha.load(pipe, "{args.output_dir}")`
- PEFT: `pipe.unet = PeftModel.from_pretrained(pipe.unet, "{args.output_dir}/unet")`
- ComfyUI / AUTOMATIC1111 / kohya: `{args.output_name}.safetensors` (LyCORIS LoHa)
"""


def print_summary(run: Run, args):
    if run.accelerator.is_main_process:
        print(summary(run, args))
    run.accelerator.end_training()


def summary(run: Run, args) -> str:
    out = Path(args.output_dir)
    trained = run.global_step - run.first_step
    head = (f"trained {trained} steps ({run.first_step} to {run.global_step})" if run.first_step and trained else
            f"trained {run.global_step} steps" if trained else
            f"nothing to train: the run is already at step {run.global_step} (--max_train_steps "
            f"{run.max_train_steps}); raise --max_train_steps to train on. Outputs rewritten")
    lines = [f"{head}; wrote to {out}/:",
             f"  unet/ (PEFT LoHa folder){' + text_encoder/, text_encoder_2/' if args.train_text_encoder else ''}",
             f"  {args.output_name}.safetensors (kohya/LyCORIS: ComfyUI, AUTOMATIC1111)",
             "  training_args.json, README.md, loss.png"]
    if args.use_ema:
        lines.insert(3, f"  {args.output_name}-raw.safetensors (the trained weights; the other files hold the EMA)")
    saved = sorted(out.glob(f"{args.output_name}-*.safetensors"))
    saved = [f for f in saved if f.name != f"{args.output_name}-raw.safetensors"]
    if saved:
        lines.append(f"  saved along the way: {saved[0].name}" if len(saved) == 1 else
                     f"  {len(saved)} files saved along the way: {saved[0].name} ... {saved[-1].name}")
    if run.validation_losses:
        lines.append(f"  validation loss: {run.validation_losses[0][1]:.5f} at step {run.validation_losses[0][0]}, "
                     f"{run.validation_losses[-1][1]:.5f} at step {run.validation_losses[-1][0]}")
    if run.last_grid:
        lines.append(f"  samples: {run.last_grid.parent}/ (latest {run.last_grid.name})")
    elif args.sample_prompts:
        lines.append(f"  samples: {out / 'samples'}/")
    if run.last_checkpoint:
        lines.append(f"  checkpoints: latest {run.last_checkpoint.name}")
    if args.report_to == "tensorboard":
        lines.append(f"  logs: tensorboard --logdir {out / args.logging_dir} (this run: "
                     f"{Path(args.run_logging_dir).name})")
    if run.train_seconds:
        lines.append(f"speed: {run.images_seen / run.train_seconds:.2f} images/s")
    if run.skipped_updates:
        lines.append(f"warning: {run.skipped_updates} updates were skipped for NaN/Inf loss")
    if run.data.skipped:
        lines.append(f"warning: {len(run.data.skipped)} samples were skipped: "
                     + ", ".join(name for name, _ in run.data.skipped))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
