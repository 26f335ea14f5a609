#!/usr/bin/env bash
# One-command GPU check (< 10 min on one H100/H200, no network):
#   1. env           torch / CUDA / device, and which optional imports are missing (the rest continues)
#   2. pytest_cuda   pytest -m cuda tests/test_cuda.py (fp16/bf16 steps, forward process, CPU-vs-CUDA
#                    anomaly maps, NCCL single rank)
#   3. bench_models  benchmarks/bench_models.py --config brats --batch 14 --precision bf16 (v2, hae_v2)
#   4. train_step    full training step (fwd+bwd+AdamW, bf16 autocast) at the BraTS config, batch 14:
#                    step time, images/s, peak memory (v2, hae_v2)
#   5. translation   AnoFPDM forward process, random-weight BraTS-config model, random inputs (batch 16):
#                    a few steps timed, slices/s extrapolated to 600 forward steps (v2, hae_v2)
#   6. inference_modes  benchmarks/bench_inference.py, BraTS config, batch 16: fp32 eager vs bf16, fp16,
#                    torch.compile and early stop side by side (speed-up, max |dM_t|, identical t_e)
# Writes ONE JSON: ${OUT:-gpu_check_out}/gpu_check.json (every stage's status, time and results; a failed
# stage is recorded and the others still run) and prints a summary table. Exit status: 0 all stages ok,
# 1 some stage failed (details in the JSON), 2 the summary itself failed.
#
# GPU_CHECK_DRY_RUN=1: tiny configs on CPU (checks the script itself in a few seconds; used by CI).
# PYTHON=...: interpreter (default: python3). TRANSLATION_STEPS=N: timed forward steps (default 20).
set -u

cd "$(dirname "$0")/.." || exit 1
OUT_DIR="${OUT:-gpu_check_out}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
PY="${PYTHON:-python3}"
STAGES="$OUT_DIR/stages"
mkdir -p "$STAGES" || exit 1
rm -f "$STAGES"/*.json "$STAGES"/*.status "$STAGES"/*.log
export GPU_CHECK_DRY_RUN="$DRY" GPU_CHECK_STAGES="$STAGES" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then export OMP_NUM_THREADS=1; else export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"; fi
have_timeout=0
command -v timeout >/dev/null 2>&1 && have_timeout=1

# run_stage NAME TIMEOUT_S CMD...: runs CMD, logs to stages/NAME.log, records rc and seconds
run_stage() {
    local name="$1" limit="$2"
    shift 2
    local t0 t1 rc
    echo "== $name"
    t0=$(date +%s.%N)
    if [ "$have_timeout" = 1 ]; then
        timeout --kill-after=10 "$limit" "$@" >"$STAGES/$name.log" 2>&1
    else
        "$@" >"$STAGES/$name.log" 2>&1
    fi
    rc=$?
    t1=$(date +%s.%N)
    printf '{"rc": %d, "seconds": %s, "timed_out": %s}\n' "$rc" \
        "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')" \
        "$([ "$rc" = 124 ] || [ "$rc" = 137 ] && echo true || echo false)" >"$STAGES/$name.status"
    tail -n 5 "$STAGES/$name.log"
    echo "   -> rc $rc"
}

# ------------------------------------------------------------------------------------------- 1. env
run_stage env 120 "$PY" - <<'PY'
import importlib, json, os, platform, sys
out = {"python": sys.version.split()[0], "platform": platform.platform(), "missing_imports": []}
for name in ("torch", "numpy", "scipy", "blobfile", "nibabel", "nilearn", "skimage", "sklearn", "matplotlib",
             "tqdm", "PIL", "mpi4py", "pytest"):
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - report any import failure
        out["missing_imports"].append(f"{name} ({type(err).__name__}: {err})"[:200])
try:
    import torch
    out.update(torch=torch.__version__, cuda_available=torch.cuda.is_available(),
               cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
               device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               nccl=torch.distributed.is_nccl_available() if torch.distributed.is_available() else False)
    if torch.cuda.is_available():
        out["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
except Exception as err:  # noqa: BLE001
    out["torch_error"] = repr(err)
print("missing imports:", ", ".join(out["missing_imports"]) or "none")
json.dump(out, open(os.path.join(os.environ["GPU_CHECK_STAGES"], "env.json"), "w"), indent=1)
PY

# ------------------------------------------------------------------------------------------- 2. pytest -m cuda
if [ "$DRY" = 1 ]; then
    run_stage pytest_cuda 300 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py \
        --junitxml="$STAGES/pytest_cuda.xml"
else
    run_stage pytest_cuda 300 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -rs \
        --junitxml="$STAGES/pytest_cuda.xml"
fi

# ------------------------------------------------------------------------------------------- 3. bench_models
if [ "$DRY" = 1 ]; then
    run_stage bench_models 300 "$PY" benchmarks/bench_models.py --config small --device cpu --batch 1 \
        --reps 1 --warmup 0 --threads 1 --models v2 --skip_memory --mstb_sides \
        --json "$STAGES/bench_models.json"
else
    run_stage bench_models 300 "$PY" benchmarks/bench_models.py --config brats --device cuda --precision bf16 \
        --batch 14 --reps 10 --warmup 3 --models v2 hae_v2 --mstb_sides --json "$STAGES/bench_models.json"
fi

# ------------------------------------------------------------------------------------------- 4. training step
run_stage train_step 300 "$PY" - <<'PY'
"""Full training step at the BraTS config: fwd + bwd + AdamW, bf16 autocast, batch 14."""
import json, os, time
import torch
from guided_diffusion import script_util as su

dry = os.environ["GPU_CHECK_DRY_RUN"] == "1"
dev = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
if dev.type == "cpu" and not dry:
    raise SystemExit("no CUDA device: the training-step benchmark needs one (GPU_CHECK_DRY_RUN=1 for CPU)")
flags = (dict(image_size=32, num_channels=16, channel_mult="1,2", attention_resolutions="16", num_heads=1)
         if dry else dict(image_size=128, num_channels=128, channel_mult="1,1,2,3,4",
                          attention_resolutions="32,16,8", num_heads=4))
batch, warmup, reps = (1, 0, 1) if dry else (14, 3, 10)
blocks = 1 if dry else 2
res = {"device": str(dev), "batch": batch, "precision": "bf16", "flags": flags, "models": {}}
for ver in ("v2", "hae_v2"):
    torch.manual_seed(0)
    model, diffusion = su.create_model_and_diffusion(
        unet_ver=ver, num_res_blocks=blocks, use_scale_shift_norm=True, dropout=0.1, class_cond=True,
        num_classes=2, in_channels=4, diffusion_steps=1000, **flags)
    model.to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 4, flags["image_size"], flags["image_size"], device=dev)
    y = torch.arange(batch, device=dev) % 2

    def step():
        opt.zero_grad(set_to_none=True)
        t = torch.randint(0, 1000, (batch,), device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = diffusion.training_losses(model, x, t, model_kwargs={"y": y, "threshold": 0.1})["loss"].mean()
        loss.backward()
        opt.step()
        return float(loss.detach())

    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses = [step() for _ in range(reps)]
    if dev.type == "cuda":
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / reps
    res["models"][ver] = {
        "step_s": sec, "images_per_s": batch / sec, "final_loss": losses[-1],
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
    }
    print(ver, res["models"][ver])
    del model, opt
    if dev.type == "cuda":
        torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ["GPU_CHECK_STAGES"], "train_step.json"), "w"), indent=1)
PY

# ------------------------------------------------------------------------------------------- 5. translation
run_stage translation 300 "$PY" - <<'PY'
"""AnoFPDM forward process at the BraTS config (fp32, as in evaluation): slices/s at 600 forward steps."""
import json, os, time
import torch
from guided_diffusion import script_util as su
from guided_diffusion.anofpdm import run_forward_process

dry = os.environ["GPU_CHECK_DRY_RUN"] == "1"
dev = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
if dev.type == "cpu" and not dry:
    raise SystemExit("no CUDA device: the translation benchmark needs one (GPU_CHECK_DRY_RUN=1 for CPU)")
flags = (dict(image_size=32, num_channels=16, channel_mult="1,2", attention_resolutions="16", num_heads=1)
         if dry else dict(image_size=128, num_channels=128, channel_mult="1,1,2,3,4",
                          attention_resolutions="32,16,8", num_heads=4))
batch = 1 if dry else 16
steps = 2 if dry else int(os.environ.get("TRANSLATION_STEPS", "20"))
blocks = 1 if dry else 2
target = 600
res = {"device": str(dev), "batch": batch, "timed_steps": steps, "extrapolated_to": target, "models": {}}
for ver in ("v2", "hae_v2"):
    torch.manual_seed(0)
    model, diffusion = su.create_model_and_diffusion(
        unet_ver=ver, num_res_blocks=blocks, use_scale_shift_norm=True, class_cond=True, num_classes=2,
        in_channels=4, diffusion_steps=1000, **flags)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.to(dev).eval()
    x = torch.rand(batch, 4, flags["image_size"], flags["image_size"], device=dev) * 2 - 1
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    kw = dict(ws=[1.0, 2.0, 3.0], modality=[0, 3], generator=gens)
    run_forward_process(model, diffusion, x, forward_steps=1 if dry else 2, **kw)  # warm-up (kernels, allocator)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fr = run_forward_process(model, diffusion, x, forward_steps=steps, **kw)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    per_step = sec / steps
    assert torch.isfinite(fr.div).all()
    res["models"][ver] = {
        "seconds_per_step": per_step, "calls_per_step": fr.calls / steps,
        "slices_per_s_at_600": batch / (per_step * target),
        "seconds_per_batch_at_600": per_step * target,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
    }
    print(ver, res["models"][ver])
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ["GPU_CHECK_STAGES"], "translation.json"), "w"), indent=1)
PY

# ------------------------------------------------------------------------------------------- 6. inference_modes
if [ "$DRY" = 1 ]; then
    run_stage inference_modes 300 "$PY" benchmarks/bench_inference.py --config tiny --device cpu \
        --forward_steps 4 --repeats 1 --threads 1 --skip_memory --patience 2 \
        --modes faithful bf16 fp16 early_stop --json "$STAGES/inference_modes.json"
else
    run_stage inference_modes 420 "$PY" benchmarks/bench_inference.py --config brats --device cuda \
        --batch 16 --forward_steps "${TRANSLATION_STEPS:-20}" --repeats 2 --patience 5 \
        --modes faithful bf16 fp16 compile early_stop --json "$STAGES/inference_modes.json"
fi

# ------------------------------------------------------------------------------------------- merge + summary
"$PY" - "$OUT_DIR" <<'PY'
import json, os, sys
out_dir = sys.argv[1]
stages_dir = os.path.join(out_dir, "stages")
report = {"dry_run": os.environ["GPU_CHECK_DRY_RUN"] == "1", "stages": {}}
for name in ("env", "pytest_cuda", "bench_models", "train_step", "translation", "inference_modes"):
    entry = {"rc": None, "seconds": None, "ok": False}
    status = os.path.join(stages_dir, f"{name}.status")
    if os.path.exists(status):
        entry.update(json.load(open(status)))
        entry["ok"] = entry["rc"] == 0
    result = os.path.join(stages_dir, f"{name}.json")
    if os.path.exists(result):
        try:
            entry["result"] = json.load(open(result))
        except ValueError as err:
            entry["result_error"] = str(err)
    log = os.path.join(stages_dir, f"{name}.log")
    if os.path.exists(log):
        text = open(log, errors="replace").read()
        entry["log_tail"] = text[-3000:]
        if name == "pytest_cuda":
            lines = [ln for ln in text.splitlines() if " passed" in ln or " failed" in ln or " skipped" in ln]
            entry["summary"] = lines[-1].strip("= ") if lines else None
    report["stages"][name] = entry
report["ok"] = all(e["ok"] for e in report["stages"].values())
path = os.path.join(out_dir, "gpu_check.json")
tmp = path + ".tmp"
json.dump(report, open(tmp, "w"), indent=1, default=str)
os.replace(tmp, path)

print(f"\n{'stage':<14} {'rc':>4} {'seconds':>8}  result")
print("-" * 100)
for name, e in report["stages"].items():
    r = e.get("result") or {}
    if name == "env":
        info = f"{r.get('device')} torch {r.get('torch')} cuda {r.get('cuda')}; missing: " \
               f"{', '.join(m.split(' ')[0] for m in r.get('missing_imports', [])) or 'none'}"
    elif name == "pytest_cuda":
        info = e.get("summary") or ""
    elif name == "bench_models":
        t = r.get("time_s", {})
        info = "; ".join(f"{m} fwd {1e3 * v['fwd']:.1f} ms, fwd+bwd {1e3 * v['fwd_bwd']:.1f} ms" for m, v in t.items())
    elif name == "train_step":
        info = "; ".join(f"{m} {v['step_s'] * 1e3:.1f} ms/step {v['images_per_s']:.1f} img/s "
                         f"peak {v['peak_mem_gib'] if v['peak_mem_gib'] is None else round(v['peak_mem_gib'], 2)} GiB"
                         for m, v in r.get("models", {}).items())
    elif name == "inference_modes":
        info = "; ".join(f"{m} x{v.get('speedup_vs_faithful', float('nan')):.2f} "
                         f"dM {v.get('max_abs_div_diff_vs_faithful', float('nan')):.1e} "
                         f"t_e {v.get('same_end_step_fraction', float('nan')):.2f}"
                         for m, v in r.get("modes", {}).items())
    else:
        info = "; ".join(f"{m} {v['slices_per_s_at_600']:.3f} slices/s @600 ({v['seconds_per_step'] * 1e3:.1f} ms/step)"
                         for m, v in r.get("models", {}).items())
    seconds = "-" if e["seconds"] is None else f"{e['seconds']:.1f}"
    print(f"{name:<14} {str(e['rc']):>4} {seconds:>8}  {info}")
print(f"\nwrote {path} (all stages ok: {report['ok']})")
sys.exit(0 if report["ok"] else 3)
PY
merge_rc=$?
case "$merge_rc" in
    0) exit 0 ;;
    3) exit 1 ;;  # some stage failed; see gpu_check.json
    *)  # the summary itself failed (python broken?): still leave a JSON behind
        printf '{"ok": false, "error": "summary step failed (rc %d); see %s"}\n' "$merge_rc" "$STAGES" \
            >"$OUT_DIR/gpu_check.json"
        exit 2 ;;
esac
