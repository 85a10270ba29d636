"""Run train_loha_sdxl.main under torchrun, and also write each rank's adapter weights to
<output_dir>/rank-<i>.safetensors so a test can check that DDP kept the ranks identical."""

import sys
from pathlib import Path

import safetensors.torch

import loha
import train_loha_sdxl

_save_final_outputs = train_loha_sdxl.save_final_outputs


def save_final_outputs_and_rank_weights(run, args):
    unet = run.accelerator.unwrap_model(run.trained["unet"])
    weights = {k: v.contiguous() for k, v in loha.adapter_state_dict(unet).items()}
    file = Path(args.output_dir) / f"rank-{run.accelerator.process_index}.safetensors"
    metadata = {"world": str(run.accelerator.num_processes), "distributed_type": str(run.accelerator.distributed_type)}
    safetensors.torch.save_file(weights, str(file), metadata=metadata)
    _save_final_outputs(run, args)


train_loha_sdxl.save_final_outputs = save_final_outputs_and_rank_weights

if __name__ == "__main__":
    sys.exit(train_loha_sdxl.main())
