#!/usr/bin/env bash
# kohya_ss's SDXL LoHa preset (kohya_ss presets/lora/"SDXL - LoHA AI_Characters v1.0.json").
#   MODEL=/models/sd_xl_base_1.0.safetensors DATA=/data/my_character OUT=out/loha ./kohya-ss-sdxl-loha.sh
# Where each value comes from (the preset's keys):
#   LoRA_type LyCORIS/LoHa with conv_dim 16 / conv_alpha 16: LyCORIS's default preset (full: convs too),
#   network_dim 32, network_alpha 32, max_resolution 1024,1024, enable_bucket with min/max_bucket_reso 256/2048 and
#   bucket_reso_steps 32, train_batch_size 8, epoch 100, optimizer AdamW8bit, learning_rate = unet_lr =
#   text_encoder_lr 1e-3 (the text encoders train), constant schedule, mixed_precision fp16,
#   gradient_checkpointing, min_snr_gamma 5, scale_weight_norms 2.5, caption_dropout_rate 0.05,
#   cache_latents, save_every_n_epochs 100 (every 100 epochs: with 100 epochs, only the final file), save_precision
#   fp16, sdxl_no_half_vae (ours: the VAE runs in fp32 unless --pretrained_vae_model_name_or_path gives a 16-bit-safe
#   one), min_timestep 0 / max_timestep 1000 (the defaults).
# Left out: xformers (torch's SDPA), seed "" (ours: --seed 0, so the run can be repeated).
set -euo pipefail
: "${MODEL:?set MODEL to an SDXL base: hub id, diffusers folder or single .safetensors file}"
: "${DATA:?set DATA to the image folder (kohya layout)}"
: "${OUT:=out/kohya-ss-sdxl-loha}"
exec accelerate launch "$(dirname "$0")/../../train_loha_sdxl.py" \
  --pretrained_model_name_or_path "$MODEL" --train_data_dir "$DATA" --output_dir "$OUT" --output_name loha \
  --resolution 1024 --enable_bucket --min_bucket_reso 256 --max_bucket_reso 2048 --bucket_reso_steps 32 \
  --train_batch_size 8 --num_train_epochs 100 --gradient_checkpointing \
  --preset full --rank 32 --alpha 32 --conv_rank 16 --conv_alpha 16 --train_text_encoder \
  --optimizer AdamW8bit --learning_rate 1e-3 --unet_lr 1e-3 --text_encoder_lr 1e-3 --lr_scheduler constant \
  --mixed_precision fp16 --snr_gamma 5 --scale_weight_norms 2.5 --caption_dropout_rate 0.05 --cache_latents \
  --min_timestep 0 --max_timestep 1000 --save_every_n_epochs 100 --save_precision fp16 "$@"
