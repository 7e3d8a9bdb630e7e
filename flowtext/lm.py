"""Lightning modules: one flow LM, and Evo, AR and diffusion as configurations of it.

:class:`FlowLM` owns a :class:`~flowtext.nn.FlowTransformer` (the shared vector field), a noise
schedule, and a :class:`~flowtext.regime.TrainingRegime` — which static policies' ELBOs it is
trained on (two-stream ``block(B)`` bounds, ``B = 1`` being AR and ``B = 0`` the whole sequence,
and single-stream ``diagonal(w)`` bounds), how their steps are drawn and how the loss is
weighted. :meth:`FlowLM.policy_bound` estimates the ELBO of any static policy; training draws one
bound per batch from the regime (plus the exact AR bound of every batch when the regime's
``ar_weight > 0``), and validation scores every checkpoint in bits per byte under
``autoregressive`` and the policies the regime trains on (``block(val_block_size)``,
``synchronous``), or under the ones ``val_policies`` names. The pure AR regime trains and
scores with one causal stream of ``L`` tokens, as a plain GPT does.

:class:`AutoregressiveLM`, :class:`DiffusionLM` and :class:`Evo` only change the default regime
(:meth:`TrainingRegime.autoregressive`, :meth:`~TrainingRegime.diffusion`,
:meth:`~TrainingRegime.evo`).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable

from flowtext import policies as _policies
from flowtext import schedules as _schedules
from flowtext.errors import ConfigError, NonFiniteError
from flowtext.nn import FlowNetwork, FlowTransformer, FlowTransformerConfig
from flowtext.nn.latents import prior_from_counts
from flowtext.objectives import (
    LN2,
    LossTerms,
    autoregressive_loss,
    single_stream_loss,
    two_stream_loss,
    with_t_min,
)
from flowtext.regime import DrawnBound, TrainingRegime, block_bound
from flowtext.schedules import InfoUniform

__all__ = ["AutoregressiveLM", "DiffusionLM", "Evo", "FlowLM"]

_AUTOREGRESSIVE = TrainingRegime.autoregressive()
_DIFFUSION = TrainingRegime.diffusion()
_EVO = TrainingRegime.evo()


class FlowLM(L.LightningModule):
    """A flow language model trained with the unified ELBO.

    Args:
        net: Backbone configuration (its ``vocab_size`` must match the data's tokenizer; the CLI
            links it automatically).
        schedule: Noise schedule name (see :mod:`flowtext.schedules`).
        schedule_kwargs: Keyword arguments of the schedule.
        regime: What the model trains on (a :class:`~flowtext.regime.TrainingRegime`, or its
            :meth:`~flowtext.regime.TrainingRegime.to_dict` form from a checkpoint).
        val_block_size: Block size of the ``block`` validation policy.
        val_steps_per_block: Steps per block of the ``block`` and ``synchronous`` validation
            policies.
        val_policies: Validation bounds among ``ar``, ``block`` and ``sync``; ``None``: ``ar``
            (always: the checkpoint monitor) and those the regime trains on.
        bytes_per_token: Average UTF-8 bytes per token, for bits per byte (the CLI links it to
            the data).
        optimizer: Optimizer factory taking the parameters.
        warmup_steps: Linear learning-rate warm-up steps.
        max_lr_steps: Cosine decay length in optimizer steps (``0`` = constant after warm-up).
        seed: Seed of the noise and time sampling. In training, the randomness of each batch
            is a function of the seed and the batch's position alone (see
            :meth:`batch_generators`), so a resumed or distributed run draws what an
            uninterrupted single-process run draws.
        prior_init: Start of the output prior (``net.output_prior``; ignored without it):
            ``unigram``: a fit from scratch sets ``prior_logits`` to the log of the training
            split's add-one-smoothed unigram frequencies (the data module's
            ``token_counts``, on a bounded sample; see :meth:`init_output_prior`);
            ``uniform``: zeros. A resumed fit keeps the checkpoint's values either way.
    """

    def __init__(
        self,
        net: FlowTransformerConfig | dict | None = None,
        schedule: str = "cosine",
        schedule_kwargs: dict | None = None,
        regime: TrainingRegime = _AUTOREGRESSIVE,
        val_block_size: int = 8,
        val_steps_per_block: int = 32,
        val_policies: list[str] | None = None,
        bytes_per_token: float = 1.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_steps: int = 100,
        max_lr_steps: int = 0,
        seed: int = 0,
        prior_init: str = "unigram",
    ) -> None:
        super().__init__()
        if isinstance(net, dict):  # from a checkpoint's hyper-parameters
            net = FlowTransformerConfig(**net)
        net = net if net is not None else FlowTransformerConfig()
        if isinstance(regime, dict):  # from a checkpoint's hyper-parameters
            regime = TrainingRegime(**regime)
        if not isinstance(regime, TrainingRegime):
            raise ConfigError(f"regime must be a TrainingRegime, got {type(regime).__name__}")
        self.save_hyperparameters(ignore=["optimizer"])
        self.hparams["net"] = asdict(net)  # plain data: checkpoints are read as data
        self.hparams["regime"] = regime.to_dict()
        self.net: FlowNetwork = FlowTransformer(net)
        self.schedule = _schedules.get(schedule, **(schedule_kwargs or {}))
        self.regime = regime
        self.val_block_size = val_block_size
        self.val_steps_per_block = val_steps_per_block
        self.val_policies = _check_val_policies(val_policies)
        self.bytes_per_token = bytes_per_token
        self.optimizer_factory = optimizer
        self.warmup_steps = warmup_steps
        self.max_lr_steps = max_lr_steps
        if regime.ar_tail > 0 and not max_lr_steps > 0:
            raise ConfigError(
                f"regime.ar_tail={regime.ar_tail} is a fraction of the learning-rate decay: "
                "give max_lr_steps > 0, or set ar_tail: 0"
            )
        self.seed = int(seed)
        if prior_init not in PRIOR_INITS:
            raise ConfigError(
                f"prior_init must be one of {', '.join(PRIOR_INITS)}, got {prior_init!r}"
            )
        self.prior_init = prior_init
        self._gen = torch.Generator().manual_seed(self.seed)
        self._schedule_feeds = 0

    # ------------------------------------------------------------------------------ lightning
    def setup(self, stage: str) -> None:
        """Check the data against the model before any step runs."""
        context = f"model context net.max_len={self.net.config.max_len}"
        dm = self._checked_datamodule(context, "lower seq_len or raise max_len")
        vocab = getattr(dm, "vocab_size", None)
        if vocab is not None and vocab != self.net.config.vocab_size:
            raise ConfigError(
                f"the tokenizer has {vocab} ids but the model's vocab_size is "
                f"{self.net.config.vocab_size}; set net.vocab_size (the CLI links it)"
            )
        if stage == "fit":
            self.init_output_prior(dm)

    def init_output_prior(self, datamodule: Any) -> bool:
        """Start the output prior from the data's unigram law (``prior_init="unigram"``).

        Sets ``prior_logits`` from ``datamodule.token_counts()`` (see
        :func:`~flowtext.nn.latents.prior_from_counts`) when the prior is on
        and still at its zero initialization: a model whose prior was trained (weights loaded
        from a checkpoint) keeps it. :meth:`setup` calls it at the start of every fit; on a
        resume Lightning restores the checkpoint's weights after ``setup``, so the trained
        values win there too.

        Args:
            datamodule: The fit's data module (``None``, or one without ``token_counts``:
                nothing to count, the prior stays uniform).

        Returns:
            Whether the prior was set.
        """
        logits = getattr(self.net, "prior_logits", None)
        counts = getattr(datamodule, "token_counts", None)
        if self.prior_init != "unigram" or logits is None or counts is None:
            return False
        if bool(logits.detach().any()):  # not the zero initialization: trained, keep it
            return False
        return prior_from_counts(self.net, counts())

    def _checked_datamodule(self, context: str, fix: str) -> Any:
        """The trainer's data module (``None`` outside a fit), its ``seq_len`` checked.

        Raises:
            ConfigError: ``seq_len`` exceeds ``net.config.max_len``; the message names the
                ``context`` and the ``fix``.
        """
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        seq_len = getattr(dm, "seq_len", None)
        if seq_len is not None and seq_len > self.net.config.max_len:
            raise ConfigError(f"data.seq_len={seq_len} exceeds the {context}; {fix}")
        return dm

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Store the tokenizer state so a checkpoint can decode text on its own."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tok = getattr(dm, "tokenizer", None)
        if tok is not None:
            checkpoint["flowtext_tokenizer"] = tok.state_dict()
        if isinstance(self.schedule, InfoUniform):
            checkpoint["flowtext_schedule"] = self.schedule.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore a fitted schedule's state (the info-uniform warp) saved with the weights."""
        state = checkpoint.get("flowtext_schedule")
        if isinstance(self.schedule, InfoUniform) and state is not None:
            self.schedule.load_state_dict(state)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        """A fitted schedule learns during training only (see :meth:`freeze_schedule`)."""
        if isinstance(self.schedule, InfoUniform):
            self.schedule.unfreeze()

    def freeze_schedule(self) -> None:
        """Freeze a fitted schedule: validation, tests and decoding see a fixed warp."""
        if isinstance(self.schedule, InfoUniform):
            self.schedule.freeze()

    def on_validation_start(self) -> None:  # noqa: D102
        self.freeze_schedule()

    on_test_start = on_predict_start = on_validation_start

    def feed_schedule(self, terms: LossTerms) -> None:
        """Feed an unfrozen info-uniform schedule one step's (log-SNR, cross-entropy) pairs.

        Tokens scored at a time strictly inside ``(0, 1)`` count; every
        :attr:`~flowtext.regime.TrainingRegime.schedule_fit_every` feeds the warp is refit
        (once at least two log-SNR bins have data).

        Args:
            terms: The step's estimate (its ``t``, ``ce`` and ``scored``).
        """
        sched = self.schedule
        if not isinstance(sched, InfoUniform) or sched.frozen or terms.t is None:
            return
        t = terms.t.detach()
        keep = terms.scored & (t > 0) & (t < 1)
        if not bool(keep.any()):
            return
        sched.update(sched.log_snr(t[keep].to(torch.float64)), terms.ce.detach()[keep])
        self._schedule_feeds += 1
        seen = int((~torch.isnan(sched.estimates()[1])).sum())
        if self._schedule_feeds % self.regime.schedule_fit_every == 0 and seen >= 2:
            sched.fit()  # one bin alone (a grid with one inner time) gives no curve to fit

    # ----------------------------------------------------------------------------------- losses
    def policy_bound(
        self,
        tokens: torch.Tensor,
        policy: _policies.StaticPolicy | str,
        steps: int,
        *,
        t_min: float | None = None,
        generator: torch.Generator | None = None,
        ar: bool = False,
        difficulty: bool = False,
        cover: bool | None = None,
        draws: int = 1,
        window: int | None = None,
    ) -> LossTerms:
        """One unbiased Monte Carlo estimate of the ELBO of a static policy, per token.

        Block policies (``autoregressive``, ``block(B)``, ``synchronous`` = one block) use the
        two-stream estimator (:func:`~flowtext.objectives.two_stream_loss`, every block scored
        in one pass) with ``m = steps / n_blocks`` steps per block; any other static policy
        (``diagonal``) uses the single-stream estimator
        (:func:`~flowtext.objectives.single_stream_loss`) on ``policy.grid(L, steps)``. Steps
        are drawn as the regime's ``step_sampling`` says.

        Args:
            tokens: ``[B, L]`` token ids.
            policy: A static policy or its registry name.
            steps: Global steps ``K`` of the discretization (as in ``policy.grid(L, K)`` and
                :func:`~flowtext.decoding.generate`); a multiple of the number of blocks.
            t_min: Smallest positive time of the grid; ``None``: the regime's (``t_min`` inside
                blocks of ``m > 1`` steps, :attr:`~TrainingRegime.grid_t_min` for other grids).
            generator: Noise and step generator; ``None``: the model's (seeded per batch).
            ar: Also return the exact AR bound of the batch (``ar_nats``; see
                :func:`~flowtext.objectives.two_stream_loss`).
            difficulty: Whether the caller reads the difficulty predictions; without them the
                AR policy runs as one causal stream of ``L`` tokens.
            cover: Draw every step of the grid at least once, on copies of the batch where it
                has fewer rows (times blocks) than steps (``cover`` of the estimators): a
                reported estimate then holds every term of the bound. ``None``: when the model
                is not training (validation and experiments; training keeps one draw per row).
            draws: Independent noise and step draws per sequence (the regime's
                ``noise_draws`` in training): ``nats`` and the side outputs are
                ``[draws * B, L]`` as on ``draws`` copies of the batch, while ``ar_nats`` stays
                ``[B, L]``, computed once per sequence (see the estimators' ``draws``).
            window: A block policy's noisy-stream window per row (``two_stream_loss``'s
                ``window``; then ``nats`` is ``[B, window]``); ``None``: every position.

        Returns:
            :class:`~flowtext.objectives.LossTerms`; ``nats`` ``[B, L]`` sums over tokens to an
            upper bound of ``-log p(x)`` in expectation.

        Raises:
            ConfigError: A policy without a static grid, or ``steps`` it cannot use.
        """
        resolved = _policies.resolve(policy)
        cover = not self.training if cover is None else cover
        gen = generator if generator is not None else self._gen
        length = tokens.shape[1]
        shared: dict[str, Any] = dict(  # what both estimators take alike
            generator=gen, sampling=self.regime.step_sampling, reverse=self.regime.reverse,
            ar=ar, cover=cover, draws=draws,
        )  # fmt: skip
        if not isinstance(resolved, _policies.StaticPolicy):
            raise ConfigError(f"policy_bound needs a static policy, got {resolved!r}")
        policy = resolved
        if isinstance(policy, (_policies.Block, _policies.Synchronous)):
            size = length if isinstance(policy, _policies.Synchronous) else policy.size
            n_blocks = -(-length // min(size, length))
            if not isinstance(steps, int) or steps < 1 or steps % n_blocks:
                raise ConfigError(f"steps must be a positive multiple of {n_blocks}, got {steps}")
            m = steps // n_blocks
            t_min = t_min if t_min is not None else self.regime.t_min
            return two_stream_loss(
                self.net,
                tokens,
                self.schedule,
                block_size=size,
                steps_per_block=m,
                t_min=t_min if m > 1 else None,
                difficulty=difficulty,
                window=window,
                **shared,
            )
        grid = with_t_min(
            policy.grid(length, steps, dtype=torch.float64), t_min or self.regime.grid_t_min
        )
        return single_stream_loss(self.net, tokens, grid, self.schedule, **shared)

    def training_loss(
        self,
        tokens: torch.Tensor,
        *,
        regime_generator: torch.Generator | None = None,
        step: int | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One Monte Carlo draw of the training objective: a drawn bound's :meth:`bound_loss`.

        Args:
            tokens: ``[B, L]``.
            regime_generator: Generator of the regime draw (which bound this batch trains,
                :meth:`TrainingRegime.draw`); ``None``: the model's generator, which always
                draws the noise and times.
            step: Optimizer step; inside the regime's
                :attr:`~flowtext.regime.TrainingRegime.ar_tail` the batch trains the AR bound
                alone (the draw is still made, so later draws do not shift). ``None``: no tail.

        Returns:
            ``(loss, logs)`` as :meth:`bound_loss`.
        """
        gen = regime_generator if regime_generator is not None else self._gen
        length = tokens.shape[1]
        bound = self.regime.draw(length, gen)
        if step is not None and self.regime.ar_only(step, self.max_lr_steps):
            bound = self.regime.block_bound(1, length)
        return self.bound_loss(tokens, bound)

    def bound_loss(
        self, tokens: torch.Tensor, bound: DrawnBound
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of one batch on a given bound, as the regime weighs it.

        The bound is estimated with :meth:`policy_bound` (with ``noise_draws`` draws per
        sequence unless it is the AR bound, the exact AR term computed once; a block bound on
        the regime's :meth:`~TrainingRegime.window` of every row when it has one, any other
        non-AR bound on its :meth:`~TrainingRegime.bound_rows` first rows) and weighted by
        :meth:`TrainingRegime.weight`; with ``ar_weight > 0`` the exact AR bound of the same
        batch is added, whatever was drawn (``train/ar_bpt`` is logged whenever the AR bound is
        known). With ``normalize`` each term trains as the log of its value. Noise and times come
        from the model's generator.

        Args:
            tokens: ``[B, L]``.
            bound: The bound to train (e.g. from :meth:`TrainingRegime.draw`).

        Returns:
            ``(loss, logs)``: the scalar loss (weighted ELBO nats per token + weighted AR bound +
            weighted denoiser cross-entropy + weighted difficulty loss) and values to log
            (unweighted bounds in bits per token).
        """
        regime = self.regime
        is_ar = _is_ar(bound, tokens.shape[1])
        difficulty = regime.difficulty_weight > 0 and (regime.difficulty_on_ar or not is_ar)
        window = None if is_ar else regime.window(tokens.shape[1], _block_size(bound))
        whole = is_ar or window is not None  # a window thins the bound; rows thin the others
        rows = tokens.shape[0] if whole else regime.bound_rows(tokens.shape[0])
        terms = self.policy_bound(
            tokens[:rows],
            bound.policy,
            bound.steps,
            ar=regime.ar_weight > 0,
            difficulty=difficulty,
            draws=1 if is_ar else regime.noise_draws,
            window=window,
        )
        self.feed_schedule(terms)
        elbo = terms.nats.mean()
        loss = regime.weight(bound.label) * _trained(elbo, regime.normalize)
        logs = {"train/elbo_bpt": elbo / LN2, f"train/elbo_bpt_{bound.label}": elbo / LN2}
        ar = terms.ar_nats
        if ar is not None and rows < tokens.shape[0]:  # the other rows: one causal stream
            rest = autoregressive_loss(self.net, tokens[rows:], self.schedule).nats
            ar = torch.cat([ar, rest])
        if ar is not None:
            loss = loss + regime.ar_weight * _trained(ar.mean(), regime.normalize)
        elif is_ar:
            ar = terms.nats
        if ar is not None:
            logs["train/ar_bpt"] = ar.mean().detach() / LN2
        if regime.ce_weight > 0 and not is_ar:
            ce = terms.scored_mean(terms.ce)
            loss = loss + regime.ce_weight * _trained(ce, regime.normalize)
            logs["train/ce_bpt"] = ce.detach() / LN2
        if difficulty:
            dl = terms.difficulty_loss()
            loss = loss + regime.difficulty_weight * dl
            logs["train/difficulty_mse"] = dl
        return loss, logs

    # ------------------------------------------------------------------------------ randomness
    def _key(self, *key: int) -> int:
        digest = hashlib.blake2b(repr((self.seed, *key)).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    def batch_generators(self, step: int, block: int) -> tuple[torch.Generator, int]:
        """The randomness of one training micro-batch, a pure function of its position.

        The regime (which bound to train) depends on the optimizer step only, so every rank and
        every accumulated micro-batch of a step trains the same bound, as one process with the
        whole global batch would. The noise and times depend on the global micro-batch number
        ``block``, which is also what :class:`~flowtext.data.EpochSampler` shards by: rank ``r``
        of ``W`` at its ``k``-th micro-batch holds block ``k W + r``. Nothing needs saving for
        an exact resume.

        Args:
            step: Optimizer step (``trainer.global_step``).
            block: The global index of the batch's first sample when the data gives it (the
                ``"index"`` of :class:`~flowtext.data.FlowTextDataModule` training batches),
                else the global micro-batch number.

        Returns:
            ``(regime generator, noise seed)``; the model's generator is re-seeded with the
            noise seed, and so is the global RNG (dropout) while the loss is computed.
        """
        return torch.Generator().manual_seed(self._key(0, step)), self._key(1, block)

    @contextlib.contextmanager
    def _noise_seeded(self, seed: int) -> Iterator[None]:
        self._gen.manual_seed(seed)
        if self.net.config.dropout == 0:
            yield
            return
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.default_generators[cuda[0]].manual_seed(seed)
            yield

    def _position(self) -> tuple[int, int]:
        trainer = self._trainer
        if trainer is None:
            return 0, 0
        total = trainer.fit_loop.epoch_loop.total_batch_idx
        return int(total), int(total) * trainer.world_size + trainer.global_rank

    def training_step(self, batch, batch_idx):  # noqa: D102
        tokens = batch["tokens"] if isinstance(batch, dict) else batch
        if self._trainer is None:
            loss, logs = self.training_loss(tokens)
        else:
            _, block = self._position()
            if isinstance(batch, dict) and "index" in batch:
                # the global number of the batch's first sample (flowtext.data): unlike the
                # micro-batch count it is the same under any number of ranks, so a run resumed
                # on another device count draws the same noise
                block = int(batch["index"].reshape(-1)[0])
            regime, noise = self.batch_generators(self.global_step, block)
            with self._noise_seeded(noise):
                loss, logs = self.training_loss(
                    tokens, regime_generator=regime, step=self.global_step
                )
        if not torch.isfinite(loss):
            raise NonFiniteError(
                f"non-finite training loss {loss.item()} at global step {self.global_step}, "
                f"epoch {self.current_epoch}, batch {batch_idx}; lower the learning rate, set "
                "gradient_clip_val, or train in precision=32 (the last checkpoint is untouched)"
            )
        # the bound drawn depends on the step only, so every rank logs the same keys
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, sync_dist=True)
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False, sync_dist=True)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        """Stop on a NaN or infinite gradient before it reaches the weights.

        Under ``16-mixed`` precision the gradient scaler skips such steps itself, so nothing is
        raised there.

        Raises:
            NonFiniteError: Naming the step, the batch and the first parameter affected.
        """
        trainer = self._trainer
        if trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
        if not grads:
            return
        norms = torch._foreach_norm([g for _, g in grads])
        if bool(torch.isfinite(torch.stack(norms)).all()):
            return
        bad = next(n for (n, _), v in zip(grads, norms) if not bool(torch.isfinite(v)))
        batch = trainer.fit_loop.epoch_loop.batch_idx if trainer is not None else "?"
        raise NonFiniteError(
            f"non-finite gradient of {bad} at global step {self.global_step}, epoch "
            f"{self.current_epoch}, batch {batch}; lower the learning rate, set "
            "gradient_clip_val, or train in precision=32 (the weights were not updated and the "
            "last checkpoint is untouched)"
        )

    def validation_bounds(self, length: int) -> dict[str, DrawnBound]:
        """Validation name -> bound: ``ar``, ``block<val_block_size>``, ``sync`` (those asked).

        Without ``val_policies``: ``ar`` (the checkpoint monitor; one causal stream) and the
        ones the regime trains on (``block`` if it draws blocks of more than one token, ``sync``
        if it draws the whole sequence).

        Args:
            length: Sequence length ``L``.
        """
        names = self.val_policies or _trained_val_policies(self.regime)
        sizes = {"ar": ("ar", 1), "block": (f"block{self.val_block_size}", self.val_block_size)}
        sizes["sync"] = ("sync", 0)
        m = self.val_steps_per_block
        return {sizes[n][0]: block_bound(sizes[n][1], m, length) for n in names}

    def validation_step(self, batch, batch_idx, dataloader_idx=0):  # noqa: D102
        tokens = batch["tokens"] if isinstance(batch, dict) else batch
        # the same noise at every validation (common random numbers), whatever was trained
        rank, world = (
            (0, 1) if self._trainer is None else (self.trainer.global_rank, self.trainer.world_size)
        )
        self._gen.manual_seed(self._key(2, dataloader_idx, batch_idx * world + rank))
        for name, bound in self.validation_bounds(tokens.shape[1]).items():
            nats = self.policy_bound(tokens, bound.policy, bound.steps).nats.mean()
            bpb = nats / LN2 / self.bytes_per_token
            self.log(
                f"val/bpb_{name}",
                bpb,
                prog_bar=name == "ar",
                sync_dist=True,
                batch_size=tokens.shape[0],
            )

    test_step = validation_step

    def generate(self, prompt=None, **kwargs):
        """Decode with this model's network and schedule; see :func:`flowtext.decoding.generate`.

        Args:
            prompt: Token ids (list of lists, list, or ``[B, P]`` tensor) or ``None``.
            **kwargs: ``length``, ``policy``, ``steps``, ``solver``, ``temperature``, ... as in
                :func:`flowtext.decoding.generate`.

        Returns:
            A :class:`flowtext.decoding.GenerationResult`.
        """
        from flowtext.decoding import generate

        self.freeze_schedule()
        return generate(self.net, self.schedule, prompt=prompt, **kwargs)

    def configure_optimizers(self):  # noqa: D102
        opt = self.optimizer_factory(self.parameters())
        warm, total = self.warmup_steps, self.max_lr_steps

        def factor(step: int) -> float:
            if warm and step < warm:
                return (step + 1) / warm
            if total and total > warm:
                progress = min(1.0, (step - warm) / (total - warm))
                return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


VAL_POLICIES = ("ar", "block", "sync")
"""Names a ``val_policies`` list may hold."""

PRIOR_INITS = ("unigram", "uniform")
"""Values of ``prior_init``: where the output prior starts in a fit from scratch."""


def _check_val_policies(names) -> tuple[str, ...] | None:
    if names is None:
        return None
    names = tuple(names)
    bad = [n for n in names if n not in VAL_POLICIES]
    if bad or not names:
        raise ConfigError(
            f"val_policies must be a non-empty list of {', '.join(VAL_POLICIES)}; got {list(names)}"
        )
    return names


def _trained_val_policies(regime: TrainingRegime) -> tuple[str, ...]:
    sizes = set(regime.block_sizes) if regime.single_stream_fraction < 1.0 else set()
    names = ["ar"]
    if any(size > 1 for size in sizes):
        names.append("block")
    if 0 in sizes:
        names.append("sync")
    return tuple(names)


def _trained(nats: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The loss term of a bound: itself, or ``log`` of it (``nats / nats.detach()``)."""
    return nats / nats.detach().clamp_min(1e-6) if normalize else nats


def _is_ar(bound: DrawnBound, length: int) -> bool:
    """Whether a drawn bound is the AR bound (one jump per token, left to right)."""
    policy = bound.policy
    one_token = isinstance(policy, _policies.Block) and policy.size == 1
    return (one_token or length == 1) and bound.steps == length


def _block_size(bound: DrawnBound) -> int:
    """Tokens per block of a drawn bound's policy (``0``: not a block policy, or one block)."""
    policy = bound.policy
    return policy.size if isinstance(policy, _policies.Block) else 0


class AutoregressiveLM(FlowLM):
    """Pure AR: trained only on ``block(1)`` with one jump per token (teacher forcing).

    The ELBO is then exactly the AR negative log-likelihood. Arguments as :class:`FlowLM`; the
    default regime is :meth:`TrainingRegime.autoregressive`.
    """

    def __init__(self, regime: TrainingRegime = _AUTOREGRESSIVE, **kwargs) -> None:
        super().__init__(regime=regime, **kwargs)


class DiffusionLM(FlowLM):
    """Pure diffusion: one block over the whole sequence, ``steps_per_block`` synchronous steps.

    As ``steps_per_block`` grows the bound tends to the continuous-time ELBO of an embedding
    diffusion LM on ``[t_min, 1]``. Arguments as :class:`FlowLM`; the default regime is
    :meth:`TrainingRegime.diffusion`.
    """

    def __init__(self, regime: TrainingRegime = _DIFFUSION, **kwargs) -> None:
        super().__init__(regime=regime, **kwargs)


class Evo(FlowLM):
    """Evo: a mixture of AR, block and whole-sequence bounds plus diagonal single-stream states.

    The mixture covers the states the adaptive decoder visits (committed prefixes, partially
    denoised tokens at different times, pure noise), and the progression-time head learns each
    token's commit loss. Arguments as :class:`FlowLM`; the default regime is
    :meth:`TrainingRegime.evo`.
    """

    def __init__(self, regime: TrainingRegime = _EVO, **kwargs) -> None:
        super().__init__(regime=regime, **kwargs)
