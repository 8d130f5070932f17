"""The LLaMA optimizer: global-norm clipping, then AdamW with linear warmup and cosine decay."""

import jax
import optax


def learning_rate_schedule(train_config):
    """Linear warmup from 0 to lr, then cosine decay to final_lr_fraction * lr at the last step."""
    lr = train_config.lr
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=train_config.warmup_steps,
        decay_steps=train_config.steps, end_value=lr * train_config.final_lr_fraction)


def weight_decay_mask(params):
    """Decay the matrices only: norm scales (the only vectors, stacked or not) are left alone."""
    def is_matrix(path, _):
        return getattr(path[-1], "key", None) != "scale"
    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(train_config):
    schedule = learning_rate_schedule(train_config)
    # grad_clip 0 means no clipping: optax's clip_by_global_norm(0) would zero every gradient
    clip = train_config.grad_clip
    tx = optax.chain(
        optax.clip_by_global_norm(clip) if clip else optax.identity(),
        optax.adamw(schedule, b1=train_config.b1, b2=train_config.b2, eps=train_config.eps,
                    weight_decay=train_config.weight_decay, mask=weight_decay_mask),
    )
    return tx, schedule
