#!/usr/bin/env bash
# LyCORIS's own example LoHa recipe (LyCORIS example_configs/training_configs/kohya/loha_config.toml), for SDXL.
#   MODEL=/models/sd_xl_base_1.0.safetensors DATA=/data/my_subject OUT=out/loha ./lycoris-loha-example.sh
# DATA is kohya's layout: DATA/10_sks dog/*.png with .txt captions (10 repeats a epoch, "sks dog" where an image has
# no caption file). Where each value comes from, in the order of the TOML:
#   resolution 512 -> 1024 (SDXL's size; the TOML is SD 1.5's), seed 23, max_train_epochs 2,
#   save_precision fp16, save_every_n_epochs 10, network_dim 8, network_alpha 4,
#   network_args preset=attn-mlp algo=loha, network_train_unet_only false (the text encoders train too),
#   train_batch_size 8, optimizer AdamW8bit, unet_lr / text_encoder_lr 2e-4, max_grad_norm 1,
#   optimizer_args weight_decay=0.1 betas=0.9,0.99 (our --adam_* flags), constant schedule, bf16,
#   min_snr_gamma 5, buckets 320-960 in steps of 64, caption_dropout_rate 0.05, flip_aug false,
#   cache_latents to disk, prior_loss_weight 1, sample_sampler ddim.
# Left out: clip_skip 2 (SDXL always reads the penultimate layer), max_token_length 150 (SDXL takes 77 tokens per
# encoder), multires noise (not offered: --noise_offset is the supported alternative), xformers (torch's SDPA).
set -euo pipefail
: "${MODEL:?set MODEL to an SDXL base: hub id, diffusers folder or single .safetensors file}"
: "${DATA:?set DATA to the image folder (kohya layout)}"
: "${OUT:=out/lycoris-loha}"
exec accelerate launch "$(dirname "$0")/../../train_loha_sdxl.py" \
  --pretrained_model_name_or_path "$MODEL" --train_data_dir "$DATA" --output_dir "$OUT" --output_name loha \
  --resolution 1024 --enable_bucket --min_bucket_reso 320 --max_bucket_reso 960 --bucket_reso_steps 64 \
  --seed 23 --num_train_epochs 2 --train_batch_size 8 \
  --preset attn-mlp --rank 8 --alpha 4 --train_text_encoder \
  --optimizer AdamW8bit --unet_lr 2e-4 --text_encoder_lr 2e-4 --adam_weight_decay 0.1 --adam_beta1 0.9 \
  --adam_beta2 0.99 --max_grad_norm 1.0 --lr_scheduler constant --mixed_precision bf16 \
  --snr_gamma 5 --caption_dropout_rate 0.05 --cache_latents \
  --save_precision fp16 --save_every_n_epochs 10 --sample_sampler DDIM "$@"
