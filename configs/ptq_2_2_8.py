"""Post-training quantization of the fine-tuned MiniLM-L6 at W-E-A 2-2-8 (TWN weights and word
embeddings, 8-bit activations with learned LSQ step sizes) by reconstruction (docs/quantization.md).

    python train.py --config configs/ptq_2_2_8.py --workdir runs/ptq_2_2_8 \
        --config.teacher_dir=runs/quickstart/model --config.ptq.method=rem,mrem_s,mrem_p \
        --config.ptq.qat_results=runs/qat/2_2_8/results.json

``config.ptq.method``: ``rem`` (per-matmul), ``mrem_s`` (module-wise, sequential), ``mrem_p``
(module-wise, parallel: module n on device n) or several, comma-separated (each starts from the
same calibrated quantized copy; a table and a plot compare them).  MREM-P wants one device per
module: on CPU start with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (with fewer
devices the modules share them round-robin and the run says so).
Defaults follow the published setting (Bai et al. 2022: 4 modules, lr 1e-4 with linear decay, 4,096 calibration
samples: the built-in task's whole training split of 2,016, T0 = 40 % of the steps) EXCEPT the
step counts, sized for 2 CPU cores: MREM-S / MREM-P 200 steps per module instead of 2,000
(--config.ptq.mrem.steps=2000 for the published setting) and REM 100 steps per matmul.  With ``teacher_dir`` empty the teacher is
first fine-tuned (~10 min on 2 CPU cores).  Other bit settings: configs/ptq_{4_4_8,2_2_4}.py.
"""
import ml_collections

from configs._builders import add_teacher, new_config, quant_config, train_config
from efficient_nlp.train import default_distributed_config


def get_config(w_bits=2, e_bits=2, a_bits=8, weight_method="", activation_method="lsq", method="mrem_s"):
    config = add_teacher(new_config("ptq"))
    config.quant = quant_config(a_bits, activation_method, w_bits, e_bits, weight_method)   # lsq: trained by PTQ
    config.ptq = ml_collections.ConfigDict(dict(
        method=method,             # rem | mrem_s | mrem_p | "rem,mrem_s,mrem_p"
        calibration_size=4096,     # K rows of the training split (all of it if smaller)
        seed=0,                    # calibration sample and batch order
        batch_size=32,             # MREM batch (sequences); also the activation calibration batch
        rem=dict(steps=100, learning_rate=1e-4, token_batch_size=2048, max_tokens=0),
        mrem=dict(num_modules=4, steps=200, learning_rate=1e-4),   # MREM-S and MREM-P
        mrem_p=dict(queue_size=8,          # t0: outputs of the last t0 steps queued between modules
                    teacher_forcing=0.4,   # T0 as a fraction of the steps (0 = no teacher forcing)
                    placement=[]),         # device index per module; [] = round-robin
        qat_results="",            # results.json of a qat run, shown next to PTQ in the table
    ))
    config.train = train_config(eval_batch_size=128, progress_bar=False)   # only eval_batch_size is used
    config.distributed = default_distributed_config()
    return config
