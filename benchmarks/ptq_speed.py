"""MREM-P vs MREM-S wall time (Bai et al. 2022: MREM-P is about N times faster on N devices).

    python benchmarks/ptq_speed.py --teacher_dir runs/quickstart/model [--devices 4] [--steps 40]
        [--calibration 512] [--bits 2,2,8] [--queue 8] [--threads one|all]

Two fresh processes, one after the other, on the same calibrated W-E-A copy of the teacher
(built-in task, same seeds): MREM-S on ONE device (the sequential baseline) and MREM-P on
``--devices`` devices (CPU: simulated with ``--xla_force_host_platform_device_count``), N = 4
modules.  Each first runs a short untimed pass (compiles every jitted step), then the timed run
of ``--steps`` steps per module; "train" is the optimisation alone (MREM-S: the sum of its
modules' ``train_seconds``; MREM-P: ``seconds_train``, fill included), "total" adds the
module-loss evaluations.  Printed: both times, the speed-up S / P next to the ideal
``min(N, cores)`` and the fraction of the ideal reached (goal >= 0.8), and the dev accuracy of
the full-precision teacher and of both results.

``--threads one`` (default) runs every device computation single-threaded
(``--xla_cpu_multi_thread_eigen=false``): the ideal is then min(N, cores) as in the issue;
with ``all`` XLA already spreads one device's matmuls over every core, so MREM-S on one device
uses the machine too and the ideal speed-up is ~1.  Simulated CPU devices share the host's
cores with everything else running: report the load average printed next to the times.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def child(args):
    """One method in this process (XLA_FLAGS already set by the parent)."""
    sys.path.insert(0, ROOT)
    import jax
    import numpy as np

    from configs import ptq_2_2_8
    from efficient_nlp import models, quant, train
    from efficient_nlp.quant import mrem, ptq
    from efficient_nlp.quant.mrem_parallel import mrem_p
    from efficient_nlp.recipes.common import load_data

    config = ptq_2_2_8.get_config(*[int(b) for b in args.bits.split(",")])
    task = load_data(config, args.teacher_dir)
    teacher = models.from_pretrained(args.teacher_dir, num_labels=task.spec.num_labels)
    calib, _ = ptq.calibration_set(task.train, args.calibration, seed=0)
    qmodel, _ = quant.quantize_model(teacher, quant.spec_from_config(config.quant.to_dict()))
    quant.calibrate(qmodel, {k: v[:32] for k, v in calib.items()})
    kw = dict(num_modules=4, learning_rate=1e-4, batch_size=32, log=None)

    def run(steps):
        if args.method == "mrem_s":
            out, rep, _ = mrem.mrem_s(qmodel, teacher, calib, steps=steps, **kw)
            return out, sum(r["train_seconds"] for r in rep), {}
        out, _, info = mrem_p(qmodel, teacher, calib, steps=steps, queue_size=args.queue, **kw)
        return out, info["seconds_train"], info

    def accuracy(model):
        logits = train.predict(model, task.dev, 128)
        return float(np.mean(np.argmax(logits, -1) == task.dev["labels"]))

    run(min(args.steps, args.queue + 2))   # compiles
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    out, train_seconds, info = run(args.steps)
    total = time.perf_counter() - t0
    print("RESULT " + json.dumps(dict(method=args.method, devices=len(jax.devices()), total=total,
                                      train=train_seconds, accuracy=accuracy(out), fp_accuracy=accuracy(teacher),
                                      load=load, info=info)), flush=True)


def spawn(args, method, devices):
    flags = [f"--xla_force_host_platform_device_count={devices}"]
    if args.threads == "one":
        flags.append("--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags),
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    print(f"running {method} on {devices} simulated device(s) in a fresh process ...", flush=True)
    started = time.perf_counter()
    cmd = [sys.executable, os.path.abspath(__file__), "--child", method] + [
        f"--{k}={v}" for k, v in vars(args).items() if k not in ("child", "devices")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.exit(f"{method} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    print(f"  {method} done in {time.perf_counter() - started:.0f} s", flush=True)
    return json.loads(lines[-1][len("RESULT "):])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher_dir", default=os.environ.get("EFFICIENT_NLP_TEACHER_DIR", ""),
                        help="fine-tuned full-precision teacher (HF directory)")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--bits", default="2,2,8")
    parser.add_argument("--queue", type=int, default=8)
    parser.add_argument("--threads", choices=("one", "all"), default="one")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.teacher_dir:
        parser.error("--teacher_dir (or EFFICIENT_NLP_TEACHER_DIR) is required: a fine-tuned teacher, e.g. "
                     "runs/quickstart/model from `python train.py --config configs/quickstart.py`")
    if args.child:
        args.method = args.child
        return child(args)
    s = spawn(args, "mrem_s", 1)
    p = spawn(args, "mrem_p", args.devices)
    cores = os.cpu_count()
    ideal = min(4, args.devices, cores)
    ratio = s["train"] / p["train"]
    print(f"MREM-S (1 device) vs MREM-P ({args.devices} devices), 4 modules, {args.steps} steps, K={args.calibration}, "
          f"W-E-A {args.bits.replace(',', '-')}, threads per device: {args.threads}, {cores} cores")
    print(f"{'':8}{'train s':>10}{'total s':>10}{'dev acc':>10}{'load':>8}")
    for name, r in (("MREM-S", s), ("MREM-P", p)):
        print(f"{name:8}{r['train']:>10.1f}{r['total']:>10.1f}{r['accuracy']:>10.4f}{r['load']:>8.1f}")
    print(f"full-precision dev accuracy {s['fp_accuracy']:.4f}; MREM-P fill {p['info']['seconds_fill']:.1f}s, "
          f"parallel {p['info']['seconds_parallel']:.1f}s")
    print(f"speed-up S/P {ratio:.2f}x, ideal min(N, cores) = {ideal}, fraction of ideal {ratio / ideal:.2f} "
          f"(goal >= 0.8)")


if __name__ == "__main__":
    main()
