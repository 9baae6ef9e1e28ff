"""bf16 autocast on the CPU (`cryowae.precision`): detection from /proc/cpuinfo, the
float32 path left bit for bit as without autocast, bf16 near float32, the one-line
notes, training steps under bf16.

Where this CPU lacks bf16 instructions, the bf16 tests turn the detection on
(`cpu_bf16_flags`): the arithmetic is then torch's real CPU bf16 autocast, computed by
its slower reference kernels, so the numbers are those a bf16 CPU computes up to the
order of its sums.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import cryowae.precision as precision
from cryowae.io import read_volume
from cryowae.models.protocol import ModelOnDevice
from cryowae.models.restorer import RestorerConfig, WAERestorer
from cryowae.precision import ComputeSettings, amp_active, amp_note, cpuinfo_bf16_flags
from cryowae.tiling import TileSettings, run_tiles
from cryowae.tiling.runner import model_tile_fn

from .conftest import invoke_cli, write_smooth_tomogram

CPU_HAS_BF16 = precision.cpu_has_bf16()

X86_AVX2 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 avx avx2 fma "
            "f16c bmi2\n\nprocessor\t: 1\nflags\t\t: fpu sse sse2 avx avx2 fma f16c bmi2\n")
X86_BF16 = ("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 amx_bf16 "
            "amx_tile\n")
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU part\t: 0xd40\n"


def _restorer(seed: int = 0) -> ModelOnDevice:
    """A small restorer with a random (non-zero) head: conv3d, GroupNorm, SiLU,
    transposed convs, the low-pass skip and the FiLM path all run."""
    torch.manual_seed(seed)
    model = WAERestorer(RestorerConfig(4, 2, 8)).eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)
    return ModelOnDevice(model, torch.device("cpu"))


def _restore(fn, data: np.ndarray, tile: int = 16, overlap: int = 4) -> np.ndarray:
    plan = TileSettings(tile, overlap).plan(data.shape, 4)
    out = np.zeros(data.shape, np.float32)

    def sink(where, block):
        out[where] = block

    run_tiles(fn, data, plan, sink, norm=(3.0, 2.0), device="cpu", batch_size=3, prefetch=0)
    return out


def _volume(shape=(24, 36, 40), seed=1) -> np.ndarray:
    return np.random.default_rng(seed).normal(3.0, 2.0, size=shape).astype(np.float32)


def _rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))


@pytest.fixture()
def bf16_cpu(monkeypatch):
    """This CPU reported as having bf16 instructions (see the module docstring)."""
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("avx512_bf16",))


# ------------------------------------------------------------------------ detection

def test_bf16_flags_are_read_from_cpuinfo_lines():
    assert cpuinfo_bf16_flags(X86_AVX2) == []
    assert cpuinfo_bf16_flags(X86_BF16) == ["amx_bf16", "avx512_bf16"]
    assert cpuinfo_bf16_flags(ARM_BF16) == ["bf16"]
    # a flag's name elsewhere (model name, bugs) is not a flag
    assert cpuinfo_bf16_flags("model name\t: avx512_bf16 edition\nflags\t: avx2\n") == []


def test_this_machines_detection_matches_its_cpuinfo():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    words = set(text.split())
    assert CPU_HAS_BF16 == bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def test_amp_decision_per_device(monkeypatch):
    for flags, has in (((), False), (("amx_bf16",), True)):
        monkeypatch.setattr(precision, "cpu_bf16_flags", lambda f=flags: f)
        assert amp_active("cpu", True) is has
        assert amp_active("cpu", None) is (has and precision.CPU_AMP_DEFAULT)
        assert amp_active("cpu", False) is False
        assert amp_active("cuda", None) and amp_active("cuda:1", True)
        assert not amp_active("cuda", False)
        assert not amp_active("meta", True)


def test_notes_say_when_bf16_runs_or_is_ignored(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())
    assert amp_note("cpu", True) == ("note: --amp ignored on cpu: this CPU has no bf16 "
                                     "instructions (avx512_bf16, amx_bf16); running in "
                                     "float32")
    assert amp_note("cpu", None) is None and amp_note("cpu", False) is None
    assert amp_note("cuda", True) is None and amp_note("cuda", None) is None
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("amx_bf16", "avx512_bf16"))
    used = "note: bf16 autocast on the CPU (amx_bf16, avx512_bf16); --no-amp runs in float32"
    assert amp_note("cpu", True) == used
    assert amp_note("cpu", False) is None
    # train: the option not given, the config asking for amp
    assert amp_note("cpu", None, True) == used


# ------------------------------------------------------------------ restore, float32

@pytest.mark.parametrize("amp", [None, False, True])
def test_float32_restore_is_bit_identical_to_no_autocast(amp):
    """Without bf16 (amp off, or a CPU without bf16 instructions) the tile function's
    output equals the same model run with autocast explicitly disabled, bit for bit."""
    if amp is True and CPU_HAS_BF16:
        pytest.skip("this CPU runs --amp in bf16")
    r = _restorer()
    data = _volume()

    def plain(x, refs):
        with torch.inference_mode(), torch.autocast("cpu", enabled=False):
            return r.model(x)

    ref = _restore(plain, data)
    out = _restore(model_tile_fn(r, ComputeSettings(amp=amp)), data)
    assert np.array_equal(out, ref)
    assert np.std(ref) > 0.1  # a real restoration, not zeros


# --------------------------------------------------------------------- restore, bf16

def _bf16_against_fp32() -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(float32, bf16, low-pass part) restorations of one volume and the relative RMS
    change of the normalised input when rounded to bf16."""
    r = _restorer()
    data = _volume()
    f32 = _restore(model_tile_fn(r, ComputeSettings(amp=False)), data)
    b16 = _restore(model_tile_fn(r, ComputeSettings(amp=True)), data)
    with torch.no_grad():  # the same model without the decoder's correction
        r.model.head.weight.zero_()
        r.model.head.bias.zero_()
    low = _restore(model_tile_fn(r, ComputeSettings(amp=False)), data)
    x = (data - 3.0) / 2.0  # the normalised input
    rounded = torch.from_numpy(x).bfloat16().float().numpy()
    return f32, b16, low, _rel_rms(rounded, x)


def _check_bf16_near_float32(f32, b16, low, input_rounding) -> None:
    """bf16 carries 8 significant bits (unit roundoff u = 2^-9 = 2.0e-3): rounding the
    input alone moves it by about 1e-3 relative RMS. The low-pass skip, the head and
    their sum run in float32, so only the decoder's correction (output - low-pass)
    carries bf16 rounding: its error stays within a few u of the correction's RMS --
    and is not 0, which would mean bf16 did not run."""
    u = 2.0 ** -9
    assert 4e-4 < input_rounding < 2e-3
    corr = float(np.sqrt(np.mean((f32 - low) ** 2)))
    err = float(np.sqrt(np.mean((b16 - f32) ** 2)))
    assert corr > 0.02 * float(np.sqrt(np.mean(f32 ** 2)))  # a real correction
    assert 0 < err < 8 * u * corr, (err, corr)


@pytest.mark.slow
def test_bf16_restore_is_near_float32(bf16_cpu):
    _check_bf16_near_float32(*_bf16_against_fp32())


@pytest.mark.skipif(not CPU_HAS_BF16, reason="this CPU has no bf16 instructions")
def test_bf16_restore_is_near_float32_on_this_bf16_cpu():
    _check_bf16_near_float32(*_bf16_against_fp32())


def test_bf16_low_pass_output_is_float32_exact(bf16_cpu):
    """A fresh restorer's head is zero, so its output is the learnable low-pass of the
    input alone; run in float32 under bf16 autocast, it equals the float32 output bit
    for bit, and the output is float32."""
    torch.manual_seed(0)
    model = WAERestorer(RestorerConfig(4, 2, 8)).eval()
    x = torch.from_numpy(_volume((16, 16, 16)))[None, None]
    with torch.inference_mode():
        ref = model(x)[0]
        with precision.autocast("cpu", True):
            out = model(x)[0]
    assert out.dtype == torch.float32
    assert torch.equal(out, ref)
    assert float(ref.std()) > 0.1


def test_sampler_settings_carry_amp_to_the_family(bf16_cpu):
    """`SamplerSettings.amp` reaches the sampler's networks: bf16 changes the samples a
    little and family.json says which ran."""
    from cryowae.sampling import sample_array
    from cryowae.sampling.settings import SamplerSettings

    from .test_sampling import _tomogram, stochastic_restorer

    r = stochastic_restorer()
    data = _tomogram((16, 16, 16))
    fams = {amp: sample_array(r, data, SamplerSettings(1, "prior", TileSettings(16, 8),
                                                       amp=amp)) for amp in (False, True)}
    assert fams[False].info["bf16_autocast"] is False
    assert fams[True].info["bf16_autocast"] is True
    diff = _rel_rms(fams[True].samples, fams[False].samples)
    assert 0 < diff < 2e-2, diff


# --------------------------------------------------------------------- CLI, training

@pytest.fixture()
def tomo(tmp_path) -> Path:
    return write_smooth_tomogram(tmp_path)


@pytest.mark.slow  # 6 s: six training steps, three in bf16 fallback kernels
def test_training_steps_under_cpu_bf16_have_finite_losses(bf16_cpu, tomo, tmp_path):
    from cryowae.training.config import TrainConfig
    from cryowae.training.data import load_sources
    from cryowae.training.loop import Trainer

    def run(amp, name):
        cfg = TrainConfig.from_dict(dict(
            patch_size=16, channels=4, depth=2, latent_dim=8, batch_size=2, bank_size=64,
            steps=3, check_prior_preference=False, device="cpu", seed=1, amp=amp,
            family={"branch_every": 1}))
        tr = Trainer(load_sources([tomo], [], [], min_size=16), cfg, tmp_path / name)
        return [tr.train_step() for _ in range(3)]

    b16, f32 = run(True, "b16"), run(None, "f32")
    for b, f in zip(b16, f32, strict=True):
        assert all(np.isfinite([b["rec"], b["loss"], b["fam_loss"]]))
        assert abs(b["rec"] - f["rec"]) < 0.02 * abs(f["rec"])
    # the head starts at zero, so the first restoration is the float32 low-pass in
    # both runs; once the head has learnt, bf16 shows (and None stayed float32)
    assert b16[0]["rec"] == f32[0]["rec"]
    assert b16[2]["rec"] != f32[2]["rec"]


@pytest.mark.slow  # 6 s: two CLI restores
@pytest.mark.skipif(CPU_HAS_BF16, reason="this CPU runs --amp in bf16")
def test_cli_restore_amp_ignored_without_bf16_and_output_unchanged(tomo, tmp_path):
    from cryowae.models.checkpoint import save_restorer
    from cryowae.training.config import TrainConfig

    r = _restorer()
    model = tmp_path / "model.pt"
    save_restorer(model, r.model, TrainConfig(patch_size=16, restorer=RestorerConfig(4, 2, 8)
                                              ).to_dict(), voxel_size=10.0, norm=(0.0, 1.0),
                  codes=torch.randn(16, 8))
    outs = []
    for extra in (["--no-amp"], ["--amp"]):
        out = tmp_path / f"r{extra[0]}.mrc"
        res = invoke_cli("restore", model, tomo, "--out", out, "--device", "cpu", "--tile",
                         "16", "--overlap", "4", *extra)
        assert res.returncode == 0, res.stderr
        notes = [ln for ln in res.stderr.splitlines() if ln.startswith("note: ")]
        assert notes == ([amp_note("cpu", True)] if extra == ["--amp"] else [])
        outs.append(read_volume(out).numpy())
    assert np.array_equal(*outs)


# ------------------------------------------------------------- peak FLOP rate (gpu_check)

def _cpu_peak():
    """benchmarks/cpu_peak.py (not a package), imported by path."""
    import importlib.util
    import sys

    if "cpu_peak" not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_peak.py"
        spec = importlib.util.spec_from_file_location("cpu_peak", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["cpu_peak"] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules["cpu_peak"]


LSCPU_ZEN3 = ("Vendor ID:  AuthenticAMD\nModel name:  AMD EPYC\nCPU family:  25\n"
              "Flags:  fpu sse2 avx fma avx2 f16c\n")
LSCPU_SPR = ("Vendor ID:  GenuineIntel\nCPU family:  6\nCPU max MHz:  3800.0000\n"
             "CPU MHz:  2000.000\nFlags:  fma avx2 avx512f avx512_bf16 amx_bf16\n")
LSCPU_ZEN4 = ("Vendor ID:  AuthenticAMD\nCPU family:  25\nCPU MHz:  2400.000\n"
              "Flags:  fma avx2 avx512f avx512_bf16\n")


def test_peak_flops_per_cycle_and_clock_from_lscpu_texts():
    cp = _cpu_peak()
    # 2 FMA pipes x (256 or 512 bits / 32) lanes x 2 FLOPs; bf16 dot product: twice
    assert cp.flops_per_cycle(cp.cpuinfo_fields(LSCPU_ZEN3)) == (32, None)
    assert cp.flops_per_cycle(cp.cpuinfo_fields(LSCPU_SPR)) == (64, 128)
    assert cp.flops_per_cycle(cp.cpuinfo_fields(LSCPU_ZEN4)) == (32, 64)
    assert cp.flops_per_cycle(cp.cpuinfo_fields("Flags: sse2 avx\n")) == (None, None)
    # max MHz first, else MHz, else /proc/cpuinfo's cpu MHz
    assert cp.clock_ghz(LSCPU_SPR) == 3.8
    assert cp.clock_ghz(LSCPU_ZEN4) == 2.4
    assert cp.clock_ghz(LSCPU_ZEN3, "processor\t: 0\ncpu MHz\t\t: 2445.408\n") == 2.445408
    assert cp.clock_ghz(LSCPU_ZEN3) is None
    peak = cp.CpuPeak(threads=2, ghz=2.5, fp32_per_cycle=32, bf16_per_cycle=64)
    assert peak.fp32_tflops == pytest.approx(0.16) and peak.bf16_tflops == pytest.approx(0.32)
    assert peak.formula(True) == "2 cores x 2.50 GHz x 64 FLOPs/cycle"


def test_conv_rate_counts_the_convolution_flops():
    """2 x 12 x 12 x 27 FLOPs per output voxel: the rate times the seconds gives it back."""
    cp = _cpu_peak()
    tflops, seconds = cp.conv_rate(False, 8, batch=1, repeats=1)
    assert tflops * 1e12 * seconds == pytest.approx(2 * 12 * 12 * 27 * 8 ** 3, rel=1e-9)
