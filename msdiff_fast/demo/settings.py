"""What the demo runs: its settings (full, quick) and its three models with their samplers."""

import dataclasses
from typing import List, Optional, Tuple

from ..restoration import ModelSpec, SamplerSpec
from ..samplers.timesteps import MAX_STEPS

USUAL_NFE = {"pc": 2000, "posterior": 100}
DATA = ("photos", "synthetic")
# what `msdiff demo` writes (besides runs/, which it refuses to reuse)
DEMO_OUTPUTS = ("report.md", "metrics.json", "samples.png", "nfe_curve.png")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """What the demo runs. ``full()`` fits about 15 minutes on 2 CPU cores, ``quick()`` about one.

    photos: training patches of ``image_size`` cut from scikit-image's training photographs, the
    held-out photographs restored whole; both ``downscale``d so that a whole photograph is a few
    dozen tiles. ``reference_images``: how many held-out images the predictor-corrector reference
    (2000 network evaluations per tile) restores; the CMDE model is evaluated on those only."""

    is_quick: bool
    data: str
    image_size: int
    downscale: int
    train_steps: int
    batch_size: int
    lr: float
    warmup: int
    amp: str
    test_images: int
    test_crop: Optional[int]
    reference_images: int
    nfe: Tuple[int, ...]
    samples_per_input: int
    pc_nfe: int
    posterior_nfe: int
    sr_scale: int = 2
    noise_sigma: float = 25.0
    seed: int = 0

    @classmethod
    def full(cls, data: str = "photos") -> "DemoSettings":
        photos = cls(
            is_quick=False,
            data=data,
            image_size=32,
            downscale=4,
            train_steps=800,
            batch_size=16,
            lr=1e-3,
            warmup=50,
            amp="bf16",
            test_images=2,
            test_crop=None,
            reference_images=1,
            nfe=(1, 5, 10, 20),
            samples_per_input=2,
            pc_nfe=2000,
            posterior_nfe=100,
        )
        if data == "synthetic":
            return dataclasses.replace(photos, image_size=16, downscale=1, train_steps=1500, test_images=16, reference_images=16)
        return photos

    @classmethod
    def quick(cls, data: str = "photos") -> "DemoSettings":
        return dataclasses.replace(
            cls.full(data),
            is_quick=True,
            image_size=16,
            downscale=4,
            train_steps=20,
            batch_size=4,
            warmup=5,
            test_images=2,
            test_crop=24 if data == "photos" else None,
            reference_images=2,
            pc_nfe=10,
            posterior_nfe=5,
        )

    def train_config(self, **changes):
        """The demo's training recipe as a ``TrainConfig`` (Adam with warm-up, EMA 0.999, the
        settings' precision and seed, no intermediate checkpoints); ``changes`` override fields."""
        from ..training.config import TrainConfig

        recipe = dict(
            steps=self.train_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup=self.warmup,
            ema_decay=0.999,
            amp=self.amp,
            seed=self.seed,
            log_every=self.train_steps,
            checkpoint_every=0,
            progress=False,
        )
        return TrainConfig(**{**recipe, **changes})

    def replace(self, **changes) -> "DemoSettings":
        settings = dataclasses.replace(self, **changes)
        settings.check()
        return settings

    def check(self) -> None:
        if self.data not in DATA:
            raise ValueError(f"--data: expected one of {', '.join(DATA)}, got {self.data!r}")
        for name in (
            "train_steps",
            "batch_size",
            "test_images",
            "reference_images",
            "posterior_nfe",
            "samples_per_input",
            "downscale",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {value!r}")
        if not isinstance(self.image_size, int) or self.image_size < 12 or self.image_size % 4:
            raise ValueError(f"--image-size: expected a multiple of 4 >= 12 (SSIM needs 11 pixels), got {self.image_size!r}")
        if self.image_size % (2 * self.sr_scale):
            raise ValueError(
                f"--image-size: expected a multiple of {2 * self.sr_scale} for x{self.sr_scale} super-resolution, got {self.image_size}"
            )
        if not self.nfe or any(not isinstance(n, int) or n < 1 for n in self.nfe):
            raise ValueError(f"--nfe: expected integers >= 1, got {list(self.nfe)}")
        if not isinstance(self.pc_nfe, int) or self.pc_nfe < 2 or self.pc_nfe % 2:
            raise ValueError(f"--pc-nfe: expected an even integer >= 2 (2 network calls per step), got {self.pc_nfe!r}")
        for name, value, most in (
            ("nfe", max(self.nfe), MAX_STEPS),
            ("posterior-nfe", self.posterior_nfe, MAX_STEPS),
            ("pc-nfe", self.pc_nfe, 2 * MAX_STEPS),
        ):
            if value > most:
                raise ValueError(f"--{name}: expected at most {most} ({MAX_STEPS} sampler steps), got {value}")
        if self.data == "synthetic" and self.test_images < 2:
            raise ValueError(f"--test-images: expected at least 2 synthetic images, got {self.test_images}")
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"amp: expected 'none' or 'bf16', got {self.amp!r}")


@dataclasses.dataclass
class DemoModel:
    key: str
    title: str
    spec: ModelSpec
    fast: Tuple[SamplerSpec, ...]
    reference: SamplerSpec
    baseline: str  # what the "input" row is


def demo_models(settings: DemoSettings) -> List[DemoModel]:
    """The three models, in the order the worker processes take them (the longest first)."""
    size, scale = settings.image_size, settings.sr_scale
    samples = tuple(SamplerSpec(name, nfe) for nfe in settings.nfe if nfe > 1 for name in ("mr-sde", "mr-ode"))
    # NFE 1, one first-order step from t = T, returns the network's clean-image estimate there: the
    # posterior mean for a mean-reverting model, whose condition mu is clean. A multi-speed model
    # sees y diffused to sigma_y_max at t = T, so its one-step estimate is not that mean.
    with_mean = ((SamplerSpec("mr-ode", 1, order=1),) if 1 in settings.nfe else ()) + samples
    # residual: the network predicts the clean image minus mu, so the untrained model restores to
    # mu and training learns the correction (a noise-predicting network needs days here, see the README)
    denoise = ModelSpec(
        "denoise", {"noise_sigma": settings.noise_sigma}, "mr", {"lam_inf": 50.0 / 255.0, "target": "residual"}, "tiny", size, 3
    )
    sr_mr = ModelSpec(
        "sr", {"scale": scale, "upsample": "bicubic"}, "mr", {"lam_inf": 50.0 / 255.0, "target": "residual"}, "tiny", size, 3
    )
    # EDM preconditioning (sigma_data): the paper's plain noise prediction turns a network error e
    # into an image error sigma e, sigma up to sqrt(D_x); after minutes of training such a model
    # gets the layout of the condition but not its colours
    sr_cmde = ModelSpec(
        "sr", {"scale": scale, "upsample": "nearest"}, "cmde", {"sigma_y_max": 0.5, "sigma_data": 0.5}, "tiny", size, 3
    )
    return [
        DemoModel(
            "sr_cmde",
            f"super-resolution x{scale}, CMDE (the paper's estimator: VE SDE, sigma_y_max 0.5, EDM preconditioning)",
            sr_cmde,
            samples,
            SamplerSpec("pc", settings.pc_nfe),
            "bicubic upsampling of the low-resolution input",
        ),
        DemoModel(
            "denoise",
            f"denoising, Gaussian noise sigma {settings.noise_sigma:g}/255, mean-reverting SDE (residual prediction)",
            denoise,
            with_mean,
            SamplerSpec("posterior", settings.posterior_nfe),
            "the noisy input",
        ),
        DemoModel(
            "sr_mr",
            f"super-resolution x{scale}, mean-reverting SDE from the bicubic upsampling (residual prediction)",
            sr_mr,
            with_mean,
            SamplerSpec("posterior", settings.posterior_nfe),
            "bicubic upsampling of the low-resolution input",
        ),
    ]
