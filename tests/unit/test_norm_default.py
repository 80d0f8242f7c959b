"""`notpu train` guards the centre by default: a push whose update norm is far above anything a real run of
ours pushes is refused by the shard (ShardConfig.max_delta_norm), not applied."""
from runner.cli import build_parser
from runner.train_config import TrainConfig

from pserver.shard_state import ShardConfig


def test_notpu_train_has_a_norm_guard_on_by_default():
    default = TrainConfig(data_dir="d", out_dir="o").max_delta_norm
    assert 0 < default < 1e30  # on, and far below what overflows a float32 centre (3.4e38)
    assert ShardConfig.max_delta_norm == 0  # `pserver start` alone leaves it off
    args = build_parser().parse_args(["train", "data", "--out", "run"])
    assert args.max_delta_norm == default
    assert build_parser().parse_args(["train", "data", "--out", "run", "--max-delta-norm", "0"]).max_delta_norm == 0
