"""step_cache: structure found on real diffusers UNets / DiTs, the reuse schedule and its state
(generations, guidance branches, models), exactness where nothing is reused, no recompiles over
whole generations under ``fullgraph=True``, skips and bad options, quality on the trained UNet.

Most tests run the partitions uncompiled (``compile_rest`` returns the partition's GraphModule)
so that they exercise the real split and the executor's decisions in seconds; the tests named
``*_inductor`` compile through zc and Inductor.
"""

import copy
import gc
from pathlib import Path

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from zc.config import StepCacheConfig, ZcConfig
from zc.fx_passes import step_cache
from zc.fx_passes.pass_manager import PassReport

WEIGHTS = Path(__file__).resolve().parents[2] / "benchmarks" / "weights"
# A DDIM-like schedule of 12 steps: long enough for min_steps=10.
TIMESTEPS = [990 - 90 * i for i in range(12)]


def tiny_unet(seed=0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


def tiny_dit(seed=0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=3, num_attention_heads=2,
        attention_head_dim=8, num_embeds_ada_norm=10, norm_num_groups=1,
    ).eval()


def uncompiled(config, reports):
    """A backend that runs step_cache with partitions left as (eager) GraphModules."""

    def backend(gm, example_inputs):
        report = PassReport("step_cache")
        reports.append(report)
        executor = step_cache.prepare(gm, example_inputs, config, lambda g, inputs=None: g, report, lambda g: None)
        return gm.forward if executor is None else executor

    return backend


def cached(model, **options):
    """``model`` compiled with step_cache(**options), and the list its reports go to."""
    reports = []
    config = StepCacheConfig(enabled=True, **options)
    return torch.compile(model, backend=uncompiled(config, reports), fullgraph=True), reports


def executors():
    """The step-cache executors that have served calls (those of earlier tests are collected)."""
    gc.collect()
    return [e for e in step_cache._live_executors if e.state.counters["calls"] > 0]


class DeepFreezer:
    """Eager reference of reuse on a copy of ``model``: replaces the output of its submodule
    ``name`` by the one from its last computed call whenever ``reuse`` is set (the cached
    region's only output). A copy, so that the compiled model does not trace the hook."""

    def __init__(self, model, name):
        self.model = copy.deepcopy(model)
        self.reuse, self.saved = False, {}
        self.branch = 0
        self.model.get_submodule(name).register_forward_hook(self.hook)

    def hook(self, module, args, output):
        if self.reuse:
            return self.saved[self.branch]
        self.saved[self.branch] = output
        return output


def test_bad_options_name_the_option():
    for options, name in [({"interval": 0}, "step_cache.interval"), ({"threshold": -0.1}, "step_cache.threshold"),
                          ({"depth": 0}, "step_cache.depth"), ({"max_consecutive": -1}, "step_cache.max_consecutive"),
                          ({"min_steps": -2}, "step_cache.min_steps")]:
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            ZcConfig.from_options({"step_cache": options})
    assert ZcConfig.from_options({"step_cache": 4}).step_cache.interval == 4


def test_unet_structure_and_interval_schedule_match_an_eager_reference():
    model = tiny_unet()
    compiled, reports = cached(model, interval=3)
    freezer = DeepFreezer(model, "up_blocks.1.resnets.0")
    x = torch.randn(2, 1, 8, 8)  # batch 2: classifier-free guidance batched in one call is one state
    expected_reuse = []
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS):
            out = compiled(x, torch.tensor(t)).sample
            # first step computes, then every 3rd; the last (t=0 < the spacing) computes
            freezer.reuse = step % 3 != 0 and step != len(TIMESTEPS) - 1
            expected_reuse.append(freezer.reuse)
            torch.testing.assert_close(out, freezer.model(x, torch.tensor(t)).sample, rtol=1e-4, atol=1e-5)
            x = x * 0.9 - 0.1 * out  # a deterministic sampler step (sampler_check passes)
    (report,) = reports
    assert report.metrics["structure"] == "unet-skip"
    # DeepCache's outermost branch: only conv_in, the last up layer and the output layers stay
    assert report.metrics["deep_stages"][0] == "down_blocks.0.resnets.0"
    assert report.metrics["deep_stages"][-1] == "up_blocks.1.resnets.0"
    assert report.metrics["reuse"] == "output"
    (executor,) = executors()
    counters = executor.report()["counters"]
    assert counters["deep_reused"] == sum(expected_reuse) == 7
    assert counters["deep_computed"] == len(TIMESTEPS) - 7
    assert executor.report()["partition_calls"]["submod_0"] == len(TIMESTEPS)


class DeepForecaster(DeepFreezer):
    """Like :class:`DeepFreezer`, but a reused step gets the polynomial extrapolation (Lagrange,
    in timestep) of the submodule's outputs at its last ``order + 1`` computed steps (fewer
    while fewer were computed): ``forecast="linear"`` (1) or ``"quadratic"`` (2)."""

    def __init__(self, model, name, order=1):
        super().__init__(model, name)
        self.order, self.timestep, self.history = order, None, []

    def hook(self, module, args, output):
        if not self.reuse:
            self.history = [*self.history[-self.order:], (self.timestep, output)]
            return output
        result = 0
        for i, (t_i, f_i) in enumerate(self.history):
            weight = 1.0
            for j, (t_j, _) in enumerate(self.history):
                if j != i:
                    weight *= (self.timestep - t_j) / (t_i - t_j)
            result = result + weight * f_i
        return result


@pytest.mark.parametrize("forecast", ["linear", "quadratic"])
def test_forecast_on_a_non_uniform_schedule_matches_an_eager_reference(forecast):
    assert step_cache.computed_steps(12, 3, 1.5) == {0, 1, 4, 7, 11}
    assert step_cache.computed_steps(50, 5, 1.0) == {0, 5, 10, 15, 20, 24, 29, 34, 39, 44, 49}
    with pytest.raises(ValueError, match=r"step_cache\.forecast"):
        ZcConfig.from_options({"step_cache": {"forecast": "cubic"}})
    with pytest.raises(ValueError, match=r"step_cache\.schedule_power"):
        ZcConfig.from_options({"step_cache": {"schedule_power": 0}})
    model = tiny_unet()
    compiled, _ = cached(model, interval=3, forecast=forecast, schedule_power=1.5)
    forecaster = DeepForecaster(model, "up_blocks.1.resnets.0", order=["linear", "quadratic"].index(forecast) + 1)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS):
            out = compiled(x, torch.tensor(t)).sample
            forecaster.reuse = step not in {0, 1, 4, 7, 11}
            forecaster.timestep = t
            expected = forecaster.model(x, torch.tensor(t)).sample
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
            if step == 5:  # a forecast (from steps 0, 1 and 4) is not a plain reuse of step 4
                history, forecaster.history = forecaster.history, forecaster.history[-1:]
                assert not torch.allclose(out, forecaster.model(x, torch.tensor(t)).sample, rtol=1e-4, atol=1e-5)
                forecaster.history = history
            x = x * 0.9 - 0.1 * out
    (executor,) = executors()
    assert executor.state.counters["deep_reused"] == 7


def test_cache_survives_partitions_that_reuse_their_output_buffers():
    """CUDA graphs replay into static output memory: the next call of a partition overwrites
    what the last one returned. Here every partition writes into its own static buffers."""

    def static_outputs(gm, inputs=None):
        buffers = []

        def run(*args):
            out = gm(*args)
            outs = list(out) if isinstance(out, (tuple, list)) else [out]
            if not buffers:
                buffers.extend(torch.empty_like(o) for o in outs)
            for buffer, o in zip(buffers, outs):
                buffer.copy_(o)
            return tuple(buffers) if isinstance(out, (tuple, list)) else buffers[0]

        return run

    def backend(gm, example_inputs):
        report = PassReport("step_cache")
        config = StepCacheConfig(enabled=True, interval=3, forecast="linear")
        return step_cache.prepare(gm, example_inputs, config, static_outputs, report, lambda g: None)

    model = tiny_unet()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    forecaster = DeepForecaster(model, "up_blocks.1.resnets.0")
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS):
            out = compiled(x, torch.tensor(t)).sample.clone()
            # the forecast needs the last two computed outputs: both must have survived
            forecaster.reuse, forecaster.timestep = step % 3 != 0 and step != len(TIMESTEPS) - 1, t
            torch.testing.assert_close(out, forecaster.model(x, torch.tensor(t)).sample, rtol=1e-4, atol=1e-5)
            x = x * 0.9 - 0.1 * out
    assert executors()[0].state.counters["deep_reused"] == 7


def test_new_generation_resets_and_repeated_or_random_timesteps_compute():
    model = tiny_unet()
    compiled, _ = cached(model, interval=2)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        for t in TIMESTEPS[:5]:
            compiled(x, torch.tensor(t))
        (executor,) = executors()
        reused_before = executor.state.counters["deep_reused"]
        assert reused_before == 2
        # a new generation: the timestep goes back up -> the first step computes, exactly
        other = torch.randn(1, 1, 8, 8)
        torch.testing.assert_close(compiled(other, torch.tensor(990)).sample, model(other, torch.tensor(990)).sample)
        assert executor.state.counters["generations"] == 2
        # a new latent shape is a new generation too
        big = torch.randn(1, 1, 16, 16)
        compiled(big, torch.tensor(900))
        # random timesteps / the same timestep over and over: never reused
        executor.reset()
        for t in [500, 700, 120, 880, 880, 880, 880, 880, 30]:
            y = torch.randn(1, 1, 8, 8)
            torch.testing.assert_close(compiled(y, torch.tensor(t)).sample, model(y, torch.tensor(t)).sample)
        assert executor.state.counters["deep_reused"] == 0


def test_sequential_guidance_calls_keep_a_cache_per_branch():
    model = tiny_unet()
    compiled, _ = cached(model, interval=3)
    freezer = DeepFreezer(model, "up_blocks.1.resnets.0")
    uncond, cond = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS[:6]):
            freezer.reuse = step % 3 != 0
            for branch, x in enumerate((uncond, cond)):
                freezer.branch = branch
                out = compiled(x, torch.tensor(t)).sample
                torch.testing.assert_close(out, freezer.model(x, torch.tensor(t)).sample, rtol=1e-4, atol=1e-5)
    (executor,) = executors()
    assert executor.state.counters["deep_reused"] == 8


def test_two_models_never_share_a_cache():
    first, second = tiny_unet(0), tiny_unet(1)
    compiled_first, _ = cached(first, interval=3)
    compiled_second, _ = cached(second, interval=3)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        for t in TIMESTEPS[:3]:
            a = compiled_first(x, torch.tensor(t)).sample
            b = compiled_second(x, torch.tensor(t)).sample
        # the third step reuses each model's own deep output: compare with a solo run
        step_cache.reset_step_caches()
        for t in TIMESTEPS[:3]:
            solo = compiled_second(x, torch.tensor(t)).sample
    torch.testing.assert_close(b, solo)
    assert not torch.allclose(a, b)


class ResidualReplay:
    """Eager reference of first-block caching on a copy of ``model``: remembers the stream
    entering block 1 of its ``blocks`` list and, on a computed step, the residual the remaining
    blocks add to it; on a reused step (``reuse`` set) the last block returns the stream plus that
    residual. Blocks returning ``(text, image)`` streams (SD3) have the image stream replaced."""

    def __init__(self, model, blocks="transformer_blocks"):
        self.model = copy.deepcopy(model)
        self.reuse, self.seen = False, {}
        chain = self.model.get_submodule(blocks)
        chain[1].register_forward_pre_hook(self.entering, with_kwargs=True)
        chain[-1].register_forward_hook(self.leaving)

    def entering(self, module, args, kwargs):
        self.seen["stream"] = args[0] if args else kwargs["hidden_states"]

    def leaving(self, module, args, output):
        stream = output[-1] if isinstance(output, tuple) else output
        if self.reuse:
            stream = self.seen["stream"] + self.seen["residual"]
        else:
            self.seen["residual"] = stream - self.seen["stream"]
        return (*output[:-1], stream) if isinstance(output, tuple) else stream


def test_dit_blocks_cache_their_residual_adaptively():
    model = tiny_dit()
    compiled, reports = cached(model, threshold=0.5, depth=1)
    reference = ResidualReplay(model)
    x, labels = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS):
            reused_before = executors()[0].state.counters["deep_reused"] if step else 0
            out = compiled(x, timestep=torch.full((2,), t), class_labels=labels).sample
            (executor,) = executors()
            reference.reuse = executor.state.counters["deep_reused"] > reused_before
            expected = reference.model(x, timestep=torch.full((2,), t), class_labels=labels).sample
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
            x = x * 0.98 - 0.02 * out
    (report,) = reports
    assert report.metrics["structure"] == "repeated-blocks"
    assert report.metrics["deep_stages"] == ["transformer_blocks.1", "transformer_blocks.2"]
    assert report.metrics["reuse"] == "residual"
    assert 0 < executor.state.counters["deep_reused"] <= 4 * executor.state.counters["deep_computed"]


def tiny_pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3, sample_size=8,
        patch_size=2, cross_attention_dim=16, caption_channels=16, norm_num_groups=1,
    ).eval()
    text = torch.randn(2, 5, 16)

    def call(denoiser, x, t):
        return denoiser(x, encoder_hidden_states=text, timestep=torch.full((2,), t),
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]

    return model, call


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
    ).eval()
    text, pooled = torch.randn(2, 5, 16), torch.randn(2, 8)

    def call(denoiser, x, t):
        return denoiser(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.full((2,), t),
                        return_dict=False)[0]

    return model, call


@pytest.mark.parametrize("builder", [tiny_pixart, tiny_sd3])
def test_text_conditioned_transformers_cache_their_block_chain(builder):
    """PixArt and SD3 (two token streams; its last block hands on only the image one) are block
    chains: a feature map from the patch embedding to the output layers, or a feed-forward's
    inside, is no U to cache around."""
    model, call = builder()
    compiled, reports = cached(model, interval=2)
    reference = ResidualReplay(model)
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS):
            out = call(compiled, x, t)
            reference.reuse = step % 2 == 1 and step != len(TIMESTEPS) - 1
            torch.testing.assert_close(out, call(reference.model, x, t), rtol=1e-4, atol=1e-5)
            x = x * 0.9 - 0.1 * out[:, :4]
    (report,) = reports
    assert report.metrics["structure"] == "repeated-blocks" and report.metrics["reuse"] == "residual"
    assert report.metrics["deep_stages"][0] == "transformer_blocks.1"
    assert len(report.metrics["deep_stages"]) == len(model.transformer_blocks) - 1
    assert executors()[0].state.counters["deep_reused"] == 5


class TimeMLP(torch.nn.Module):
    """A timestep-conditioned net with no skip structure and no repeated blocks."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.out = torch.nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, x, t):
        emb = torch.sin(t.float().reshape(1, 1) * torch.arange(8.0))
        return self.out(torch.relu(self.inp(x) + emb[:, :, None, None]))


def test_graph_without_cacheable_structure_is_skipped_with_the_reason():
    model = TimeMLP().eval()
    compiled, reports = cached(model, interval=3)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, torch.tensor(5)), model(x, torch.tensor(5)))
    (report,) = reports
    assert report.status == "skipped"
    assert "no cacheable structure" in report.skips[0]["reason"]
    compiled_without_timestep, reports = cached(tiny_unet(), interval=3)
    torch._dynamo.reset()
    # a UNet called with a Python int timestep has no timestep tensor to follow
    with torch.no_grad():
        compiled_without_timestep(torch.randn(1, 1, 8, 8), 10)
    assert reports[0].status == "skipped" and "timestep" in reports[0].skips[0]["reason"]


def test_interval_one_steps_aside_so_results_are_bit_exact():
    model = tiny_unet()
    compiled, reports = cached(model, interval=1)
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        for t in TIMESTEPS[:3]:
            assert torch.equal(compiled(x, torch.tensor(t)).sample, model(x, torch.tensor(t)).sample)
    assert reports[0].status == "unchanged" and "interval 1" in reports[0].skips[0]["reason"]


@pytest.mark.slow
def test_interval_one_is_bit_exact_with_the_uncached_compile_inductor():
    model = tiny_unet()
    x = torch.randn(1, 1, 8, 8)
    plain = torch.compile(model, backend="zc")
    with torch.no_grad():
        expected = [plain(x, torch.tensor(t)).sample for t in TIMESTEPS[:3]]
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="zc", options={"step_cache": 1})
        for t, want in zip(TIMESTEPS[:3], expected):
            assert torch.equal(compiled(x, torch.tensor(t)).sample, want)


def test_fullgraph_generations_compile_once():
    from torch._dynamo.testing import CompileCounterWithBackend

    model = tiny_unet()
    counter = CompileCounterWithBackend(uncompiled(StepCacheConfig(enabled=True, interval=3), []))
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    schedule = [980 - 20 * i for i in range(50)]
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        for generation in range(2):
            for t in schedule:
                compiled(x, torch.tensor(t))
    assert counter.frame_count == 1
    (executor,) = executors()
    counters = executor.state.counters
    assert counters["generations"] == 2
    # per generation: steps 0, 3, ..., 48 and the last (t=0 < spacing) computed
    assert counters["deep_computed"] == 2 * 18 and counters["deep_reused"] == 2 * 32


def test_fullgraph_forecast_schedule_and_calibration_compile_once():
    """The new modes live in the executor too: a max_error calibration (replays included), a
    quadratic forecast on a non-uniform schedule and a DDIM sampler, still one compiled frame."""
    from torch._dynamo.testing import CompileCounterWithBackend

    config = StepCacheConfig(enabled=True, max_error=0.3, forecast="quadratic", schedule_power=1.3)
    counter = CompileCounterWithBackend(uncompiled(config, []))
    compiled = torch.compile(tiny_unet(), backend=counter, fullgraph=True)
    with torch.no_grad():
        for _ in range(2):
            ddim_generation(compiled, seed=0)
    assert counter.frame_count == 1
    (executor,) = executors()
    report = executor.report()
    assert report["calibration_failed"] is None and report["calibrated_on_steps"] == 12
    assert report["counters"]["generations"] == 2 and report["interval"] > 1
    # the second generation followed the calibrated interval's non-uniform plan
    computed = len(step_cache.computed_steps(12, report["interval"], 1.3))
    assert report["counters"]["deep_computed"] == 12 + computed
    assert report["counters"]["deep_reused"] == 12 - computed


def test_compiled_partitions_inductor():
    model = tiny_unet()
    compiled = torch.compile(model, backend="zc", options={"step_cache": 2}, fullgraph=True)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, x, torch.tensor(TIMESTEPS[0]))
        torch.testing.assert_close(out.sample, model(x, torch.tensor(TIMESTEPS[0])).sample, rtol=1e-4, atol=1e-5)
        reused = compiled(x, torch.tensor(TIMESTEPS[1])).sample
        computed = compiled(x, torch.tensor(TIMESTEPS[2])).sample
        torch.testing.assert_close(computed, model(x, torch.tensor(TIMESTEPS[2])).sample, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(reused, model(x, torch.tensor(TIMESTEPS[1])).sample)
    # three separately compiled partitions (shallow in, deep, shallow out); the deep one has
    # the convolutions of down_blocks.1 / mid_block / up_blocks.0
    assert len(codes) == 3 and all("def call(" in code for code in codes)
    (executor,) = executors()
    assert executor.report()["partition_calls"] == {"submod_0": 3, "submod_1": 2, "submod_2": 3}


@pytest.mark.slow
def test_trained_unet_quality_with_ddim_pipeline_inductor():
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(WEIGHTS / "digits_unet", torch_dtype=torch.float32).eval()
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)

    def images(unet):
        pipe.unet = unet
        return pipe(batch_size=4, num_inference_steps=50, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    with torch.no_grad():
        reference = images(torch.compile(unet, backend="inductor"))
        torch._dynamo.reset()
        approximate = images(torch.compile(unet, backend="zc", options={"step_cache": {"interval": 3, "depth": 2}}))
    mse = float(((reference - approximate) ** 2).mean())
    psnr = 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))).item()
    # benchmarks.step_cache measures 36.5 dB on 16 images (same seed); 4 images leave noise
    assert 33 < psnr < 80, psnr  # above 80 dB nothing was reused


def test_structure_of_a_conditional_unet_with_guidance_batch():
    from tests.models.builders import unet2d_condition

    model, inputs, _ = unet2d_condition()
    compiled, reports = cached(model, interval=2)
    kwargs = inputs(2)
    with torch.no_grad():
        for t in TIMESTEPS[:4]:
            out = compiled(**{**kwargs, "timestep": torch.tensor(t)})[0]
        # steps 0 and 2 computed, 1 and 3 reused; step 4 computes again
        torch.testing.assert_close(compiled(**{**kwargs, "timestep": torch.tensor(TIMESTEPS[4])})[0],
                                   model(**{**kwargs, "timestep": torch.tensor(TIMESTEPS[4])})[0], rtol=1e-4, atol=1e-5)
    (report,) = reports
    assert report.metrics["structure"] == "unet-skip"
    assert report.metrics["deep_stages"][0] == "down_blocks.0.resnets.0"
    assert "between 'conv_in' and 'up_blocks.1.resnets.1'" in report.rewrites[0]["what"]
    assert executors()[0].state.counters["deep_reused"] == 2
    assert out.shape == kwargs["sample"].shape


def test_structure_of_a_motion_unet():
    """AnimateDiff's UNetMotionModel: DeepCache's outermost branch, motion modules inside it."""
    from diffusers import UNetMotionModel

    torch.manual_seed(0)
    model = UNetMotionModel(
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
        num_attention_heads=2, motion_num_attention_heads=2, motion_max_seq_length=8, in_channels=4, out_channels=4,
    ).eval()
    compiled, reports = cached(model, interval=3)
    freezer = DeepFreezer(model, "up_blocks.1.motion_modules.0")
    x, text = torch.randn(1, 4, 4, 8, 8), torch.randn(4, 3, 16)  # one video of 4 frames
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS[:7]):
            out = compiled(x, torch.tensor(t), text).sample
            freezer.reuse = step % 3 != 0
            torch.testing.assert_close(out, freezer.model(x, torch.tensor(t), text).sample, rtol=1e-4, atol=1e-5)
            x = x * 0.9 - 0.1 * out
    (report,) = reports
    assert report.metrics["structure"] == "unet-skip"
    assert report.metrics["deep_stages"][0] == "down_blocks.0.resnets.0"
    assert "down_blocks.0.motion_modules.0" in report.metrics["deep_stages"]
    assert report.metrics["deep_stages"][-1] == "up_blocks.1.motion_modules.0"
    assert executors()[0].state.counters["deep_reused"] == 4


def ddim_generation(denoiser, seed, steps=12, scheduler=None, **step_kwargs):
    """A plain diffusers sampling loop over ``denoiser`` (DDIM, 12 steps, by default); returns the
    final latents and the latents that entered the last step."""
    from diffusers import DDIMScheduler

    # no clip_sample: random weights predict clean samples far outside [-1, 1], and clipping them
    # makes the step nonlinear (the sampler check would, rightly, not accept it)
    scheduler = scheduler or DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 1, 8, 8, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        last_input = x
        prediction = denoiser(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(prediction, t, x, generator=generator, **step_kwargs).prev_sample
    return x, last_input


def test_max_error_bounds_the_latents_of_the_calibration_generation():
    with pytest.raises(ValueError, match="step_cache.max_error"):
        ZcConfig.from_options({"step_cache": {"max_error": 0}})
    with pytest.raises(ValueError, match="exclude each other"):
        ZcConfig.from_options({"step_cache": {"max_error": 0.1, "threshold": 0.1}})
    model = tiny_unet()
    with torch.no_grad():
        exact, exact_last_input = ddim_generation(model, seed=0)
        chosen = {}
        for budget in (0.002, 0.2):
            torch._dynamo.reset()
            compiled, reports = cached(model, max_error=budget, forecast="linear")
            first, _ = ddim_generation(compiled, seed=0)
            (executor,) = executors()
            # the calibration generation computes every step: exact
            assert "deep_reused" not in executor.state.counters
            torch.testing.assert_close(first, exact, rtol=1e-4, atol=1e-5)
            second, last_input = ddim_generation(compiled, seed=0)
            report = executor.report()
            assert report["calibration_failed"] is None and report["calibrated_on_steps"] == 12
            errors, interval = report["calibrated_errors"], report["interval"]
            chosen[budget] = interval, report["counters"].get("deep_reused", 0)
            if interval > 1:
                # the replay predicted what the cached run then did, on the same seed
                actual = float((last_input - exact_last_input).norm() / exact_last_input.norm())
                assert actual <= budget and actual == pytest.approx(errors[interval], rel=1e-3, abs=1e-6)
            assert all(errors[i] <= budget for i in errors if i <= interval)
            assert interval == max(errors) or errors[interval + 1] > budget
            del executor
    # a larger budget allows a larger interval and more reuse; the small one none here
    assert chosen[0.2][0] > chosen[0.002][0] and chosen[0.2][1] > chosen[0.002][1]


def test_stochastic_samplers_compute_every_step_unless_told():
    from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    # one compiled model per setting, its caches reset between samplers (fewer compiles)
    compiled = {check: cached(tiny_unet(), interval=2, sampler_check=check)[0] for check in (True, False)}
    with torch.no_grad():
        for scheduler, kwargs, sampler_check, reuses in [
            (DDPMScheduler(num_train_timesteps=1000, clip_sample=False), {}, True, False),
            (DDIMScheduler(num_train_timesteps=1000, clip_sample=False), {"eta": 1.0}, True, False),
            (DDIMScheduler(num_train_timesteps=1000, clip_sample=False), {"eta": 0.0}, True, True),
            (DDPMScheduler(num_train_timesteps=1000, clip_sample=False), {}, False, True),
            (EulerDiscreteScheduler(num_train_timesteps=1000), {}, True, True),
            (EulerAncestralDiscreteScheduler(num_train_timesteps=1000), {}, True, False),
        ]:
            step_cache.reset_step_caches()
            ddim_generation(compiled[sampler_check], seed=0, scheduler=scheduler, **kwargs)
            (executor,) = executors()
            counters = executor.state.counters
            assert (counters["deep_reused"] > 0) == reuses, (scheduler, kwargs)
            assert counters["stochastic_generations"] == (0 if reuses else 1)
            del executor, counters
        # max_error cannot replay a stochastic sampler: the calibration says so and nothing is reused
        torch._dynamo.reset()
        step_cache.reset_step_caches()
        calibrated, _ = cached(tiny_unet(), max_error=0.5)
        for _ in range(2):
            ddim_generation(calibrated, seed=0, scheduler=DDPMScheduler(num_train_timesteps=1000, clip_sample=False))
        (executor,) = executors()
        assert "not a deterministic" in executor.report()["calibration_failed"]
        assert executor.state.counters["deep_reused"] == 0


def test_sampler_check_accepts_guidance_batched_in_one_call():
    from diffusers import DDIMScheduler

    model = tiny_dit()
    compiled, _ = cached(model, interval=2)
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    scheduler.set_timesteps(12)
    x = torch.randn(1, 1, 8, 8)
    labels = torch.tensor([3, 7])  # "unconditional" and conditional halves
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = compiled(torch.cat([x, x]), timestep=t.expand(2), class_labels=labels).sample
            guided = out[:1] + 4.0 * (out[1:] - out[:1])
            x = scheduler.step(guided, t, x).prev_sample
    (executor,) = executors()
    assert executor.state.counters["stochastic_generations"] == 0
    assert executor.state.counters["deep_reused"] > 0
