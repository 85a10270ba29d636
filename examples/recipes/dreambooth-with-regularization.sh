#!/usr/bin/env bash
# DreamBooth with prior preservation (regularization images), in kohya's folder layout.
#   MODEL=... INSTANCE=/data/sks_dog CLASS=/data/dogs OUT=out/sks-dog ./dreambooth-with-regularization.sh
# INSTANCE holds your subject (images without a caption file learn the folder's class tokens, "sks dog"); CLASS
# holds generic images of the class ("dog"). They are linked as kohya folders 20_sks dog (20 repeats an epoch) and
# 1_dog; each epoch draws as many regularization images as training draws (kohya's balance), their loss weighted
# by --prior_loss_weight. Where the numbers come from:
#   diffusers' SDXL DreamBooth LoRA example (examples/dreambooth/README_sdxl.md): 1024 px, batch 1 with 4 batches
#   accumulated, lr 1e-4, constant schedule, 500 steps, fp16 (with a 16-bit-safe VAE, below);
#   diffusers' DreamBooth guide: --with_prior_preservation --prior_loss_weight 1.0 (ours: --reg_data_dir);
#   min-SNR 5: 12 of the 19 kohya_ss SDXL presets.
# Prodigy instead, as kohya_ss's "SDXL - LoRA AI_Now prodigy v1.0" preset sets it: add
#   --optimizer Prodigy --learning_rate 1.0 --optimizer_args weight_decay=0.01 decouple=True d0=0.0001 \
#   use_bias_correction=True
set -euo pipefail
: "${MODEL:?set MODEL to an SDXL base}"
: "${INSTANCE:?set INSTANCE to a folder of images of your subject}"
: "${CLASS:?set CLASS to a folder of regularization images of its class}"
: "${OUT:=out/dreambooth}"
work="$OUT.data"
mkdir -p "$work/train" "$work/reg"
ln -sfn "$(realpath "$INSTANCE")" "$work/train/20_sks dog"
ln -sfn "$(realpath "$CLASS")" "$work/reg/1_dog"
exec accelerate launch "$(dirname "$0")/../../train_loha_sdxl.py" \
  --pretrained_model_name_or_path "$MODEL" --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \
  --train_data_dir "$work/train" --reg_data_dir "$work/reg" --prior_loss_weight 1.0 \
  --output_dir "$OUT" --output_name sks-dog \
  --resolution 1024 --train_batch_size 1 --gradient_accumulation_steps 4 --max_train_steps 500 \
  --learning_rate 1e-4 --lr_scheduler constant --mixed_precision fp16 --snr_gamma 5 \
  --gradient_checkpointing --cache_latents --checkpointing_steps 100 \
  --validation_prompt "a photo of sks dog in a bucket" --validation_steps 100 "$@"
