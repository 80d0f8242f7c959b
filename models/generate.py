"""A seeded, vectorised generator of MMO game logs ("Vikings") with churn in them.

Each player has a daily session rate, a session length, a spending level and a
clan. Churners fade in the weeks before the cut-off: fewer sessions, shorter
sessions, purchases stop, and most lose their clan. To make *when* things happen
matter, churners start out more active than average ("burn-out"), so their
90-day totals look much like everyone else's; and some loyal players take a
break and come back, which a total cannot tell from a fade-out but a sequence can.

After the cut-off churners open at most one session in the label window (so
fewer than 2 connects), non-churners keep playing. `signal` scales every churn
pattern: 0 makes churners indistinguishable before the cut-off.

Everything is numpy on whole arrays: per player [N], per player-day [N, T],
per session [S] and per event [E]; the only Python loops run over event types.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from models.events import DAY_S
from pserver.fileio import atomic_path
from models.errors import DataError

log = logging.getLogger(__name__)

BATCH_ROWS_OUT = 1 << 20  # Parquet row groups of ~1M events: what prepare reads per batch
START_UNIX_S = 1_704_067_200  # 2024-01-01T00:00:00Z: day 0 of every generated log

# Actions inside a session and their base weights (share of actions for a clan
# member who spends). Connect/disconnect/clan_join/clan_leave are placed separately.
ACTIONS = (
    ("battle", 0.20), ("raid", 0.06), ("upgrade_building", 0.10), ("train_troops", 0.13),
    ("research", 0.05), ("collect_resources", 0.17), ("trade", 0.04), ("quest_complete", 0.08),
    ("level_up", 0.01), ("clan_chat", 0.05), ("clan_help", 0.04), ("clan_war", 0.02),
    ("purchase", 0.015), ("gift_sent", 0.01), ("ad_view", 0.015), ("tutorial_step", 0.0),
)
SPECIAL = ("connect", "disconnect", "clan_join", "clan_leave")
EVENT_TYPES = SPECIAL + tuple(name for name, _ in ACTIONS)
CLAN_ACTIONS = ("clan_chat", "clan_help", "clan_war")

# Share of sessions starting in each UTC hour: quiet at night, an evening peak.
HOUR_WEIGHTS = np.array([2, 1, 1, 1, 1, 1, 2, 3, 4, 4, 4, 5, 6, 5, 5, 5, 6, 7, 9, 10, 10, 9, 7, 4], float)


@dataclass(frozen=True)
class GeneratorConfig:
    players: int
    days: int = 90  # observation days before the cut-off
    label_days: int = 21  # days after the cut-off (the talk: 3 weeks)
    seed: int = 0
    churn_rate: float = 0.3  # share of players who churn (before the newcomer filter)
    signal: float = 1.0  # strength of churners' fading patterns; 0 = none
    newcomer_share: float = 0.12  # players who join during the observation window
    break_share: float = 0.2  # loyal players who pause 4-12 days (noise for totals)
    sudden_share: float = 0.15  # churners who quit without warning (irreducible noise)


def generate_events(cfg: GeneratorConfig) -> pa.Table:
    """Columns id (dictionary string), timestamp (int64 s), event_type (dictionary string), event_value (float64, null)."""
    if cfg.players < 1 or cfg.days < 1 or cfg.label_days < 1:
        raise DataError("--players, --observation-days and label days must be positive")
    if not 0.0 <= cfg.churn_rate <= 1.0 or cfg.signal < 0:
        raise DataError("--churn-rate must be in [0, 1] and --signal >= 0")
    rng = np.random.default_rng(cfg.seed)
    n, obs, total_days = cfg.players, cfg.days, cfg.days + cfg.label_days
    players = _players(cfg, rng)
    sessions_pd = _sessions_per_day(cfg, players, rng)  # (N, T) int64
    sess_player, sess_day = np.divmod(np.repeat(np.arange(n * total_days), sessions_pd.ravel()), total_days)
    s = sess_player.size
    log.debug("%d players, %d sessions", n, s)

    # Session start and length; churners' sessions shorten after onset.
    hour = rng.choice(24, size=s, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
    start_s = START_UNIX_S + sess_day * DAY_S + hour * 3600 + rng.integers(0, 3600, s)  # (S,) int64
    fading = players["churner"][sess_player] & (sess_day >= players["onset"][sess_player]) & (sess_day < obs)
    shrink = np.where(fading, max(0.25, 1.0 - 0.5 * cfg.signal), 1.0)
    minutes = np.minimum(240.0, rng.lognormal(players["minutes_mu"][sess_player], 0.6) * shrink)  # (S,)
    n_actions = rng.poisson(players["actions_per_min"][sess_player] * minutes)  # (S,)

    weights = _action_weights(cfg, players, sess_player, sess_day, fading, rng)  # (S, K)
    ev_sess = np.repeat(np.arange(s), n_actions)  # (E_actions,)
    ev_type = _sample_rows(weights, ev_sess, rng) + len(SPECIAL)
    ev_time = start_s[ev_sess] + (rng.random(ev_sess.size) * minutes[ev_sess] * 60).astype(np.int64)

    clan_sess, clan_type = _clan_moves(players, sess_player, sess_day, total_days)
    end_s = start_s + (minutes * 60).astype(np.int64)
    all_sess = np.concatenate([np.arange(s), np.arange(s), clan_sess, ev_sess])
    all_type = np.concatenate([np.zeros(s, np.int64), np.ones(s, np.int64), clan_type, ev_type])
    all_time = np.concatenate([start_s, end_s, start_s[clan_sess] + 1, ev_time])
    # A session that runs past the end of the log is cut at the last second.
    np.minimum(all_time, START_UNIX_S + total_days * DAY_S - 1, out=all_time)
    values = _values(all_type, all_sess, minutes, players["whale"][sess_player], rng)

    order = np.argsort(all_time, kind="stable")  # logs come sorted by time
    width = len(str(n - 1))
    ids = pa.array(np.char.add("viking_", np.char.zfill(np.arange(n).astype(str), width)))  # (N,) one per player
    return pa.table({
        "id": pa.DictionaryArray.from_arrays(pa.array(sess_player[all_sess[order]].astype(np.int32)), ids),
        "timestamp": pa.array(all_time[order]),
        "event_type": pa.DictionaryArray.from_arrays(pa.array(all_type[order].astype(np.int32)), pa.array(EVENT_TYPES)),
        "event_value": pa.array(values[order], from_pandas=True),  # NaN -> null
    })


def _players(cfg: GeneratorConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    n, obs = cfg.players, cfg.days
    churner = rng.random(n) < cfg.churn_rate
    newcomer = rng.random(n) < cfg.newcomer_share
    join = np.where(newcomer, rng.integers(0, obs, n), -1)
    # Fading starts 1-6 weeks before the cut-off; sudden quitters fade only after it.
    onset = np.where(rng.random(n) < cfg.sudden_share, obs, obs - rng.integers(7, 43, n))
    spender = rng.random(n) < 0.3
    in_clan = rng.random(n) < 0.6
    # Clan moves: most fading churners lose their clan near onset; loyal members
    # sometimes switch clans (leave, rejoin days later); loners sometimes join one.
    p_lose = min(1.0, 0.75 * cfg.signal)
    loses = in_clan & churner & (onset < obs) & (rng.random(n) < p_lose)
    switches = in_clan & ~loses & (rng.random(n) < 0.08)
    leave = np.full(n, -1)
    leave[loses] = np.clip(onset[loses] + rng.integers(-7, 4, loses.sum()), 0, obs - 1)
    leave[switches] = rng.integers(0, obs, switches.sum())
    rejoin = np.full(n, -1)
    rejoin[switches] = leave[switches] + rng.integers(1, 11, switches.sum())
    joins = ~in_clan & (rng.random(n) < 0.1)
    rejoin[joins] = rng.integers(0, obs, joins.sum())
    return {
        "churner": churner, "join": join, "onset": onset, "spender": spender, "in_clan": in_clan,
        "leave": leave, "rejoin": rejoin,
        # Churners who stop paying do so up to a week before they start to fade.
        "stop_buying": np.where(churner & (rng.random(n) < min(1.0, cfg.signal)), onset - rng.integers(0, 8, n), 10**6),
        "rate": rng.lognormal(np.log(1.2), 0.5, n),  # sessions per active day
        "p_active": rng.beta(5, 2, n),  # chance to play on a given day
        "minutes_mu": np.log(15) + rng.normal(0, 0.3, n),  # log median session minutes
        "actions_per_min": rng.gamma(4, 0.15, n),
        "whale": np.where(spender, rng.normal(0, 1, n), -2.0),  # log spending level
        "tau": rng.uniform(4, 12, n),  # days for a fading churner's activity to drop by e
        "brk": np.where(~churner & (rng.random(n) < cfg.break_share), rng.integers(0, obs + cfg.label_days, n), -100),
        "brk_len": rng.integers(4, 13, n),
    }


def _sessions_per_day(cfg: GeneratorConfig, p: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    n, obs, total_days = cfg.players, cfg.days, cfg.days + cfg.label_days
    day = np.arange(total_days)[None, :]  # (1, T)
    weekend = np.where(day % 7 >= 5, 1.25, 1.0)  # day 0 is a Monday
    since = day - p["onset"][:, None]  # (N, T) days since fading began
    # Burn-out: a churner plays 25% more before onset, then decays exponentially.
    pattern = np.where(since < 0, 1.25, np.exp(-np.maximum(since, 0) / p["tau"][:, None]))
    mult = np.where(p["churner"][:, None], np.maximum(0.0, 1.0 + cfg.signal * (pattern - 1.0)), 1.0)
    on_break = (day >= p["brk"][:, None]) & (day < (p["brk"] + p["brk_len"])[:, None])
    mult = np.where(on_break, 0.0, mult)
    # Newcomers play a lot in their first week.
    fresh = (day >= p["join"][:, None]) & (day < p["join"][:, None] + 7) & (p["join"][:, None] >= 0)
    mult = np.where(fresh, mult * 1.5, mult)
    plays = rng.random((n, total_days)) < p["p_active"][:, None]
    lam = p["rate"][:, None] * weekend * mult
    sessions = np.where(plays & (day >= p["join"][:, None]), rng.poisson(lam), 0)  # (N, T)
    # Label window: a churner comes back for at most one session.
    churn = p["churner"]
    sessions[churn, obs:] = 0
    back = churn & (rng.random(n) < 0.35)
    sessions[np.flatnonzero(back), obs + rng.integers(0, cfg.label_days, back.sum())] = 1
    return sessions.astype(np.int64)


def _action_weights(cfg: GeneratorConfig, p: dict[str, np.ndarray], sp: np.ndarray, sd: np.ndarray,
                    fading: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    names = [name for name, _ in ACTIONS]
    w = np.tile(np.array([weight for _, weight in ACTIONS]), (sp.size, 1))  # (S, K)
    left = (p["leave"][sp] >= 0) & (sd >= p["leave"][sp])
    back = (p["rejoin"][sp] >= 0) & (sd >= p["rejoin"][sp])  # a switcher's rejoin comes after their leave
    in_clan = np.where(p["in_clan"][sp], ~left | back, back)  # (S,) clan member on that day
    for name in CLAN_ACTIONS:
        w[:, names.index(name)] *= in_clan
    buys = p["spender"][sp] & (sd < p["stop_buying"][sp])
    w[:, names.index("purchase")] *= np.where(buys, np.exp(0.5 * p["whale"][sp]) * 2.0, 0.05)
    w[:, names.index("ad_view")] *= np.where(p["spender"][sp], 0.2, 2.0)
    newbie = (p["join"][sp] >= 0) & (sd < p["join"][sp] + 3)
    w[:, names.index("tutorial_step")] = np.where(newbie, 0.4, 0.0)
    # Fading churners stop building and researching: they just log in and look around.
    for name in ("upgrade_building", "research", "train_troops"):
        w[:, names.index(name)] *= np.where(fading, max(0.1, 1.0 - 0.6 * cfg.signal), 1.0)
    return w


def _sample_rows(weights: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One categorical draw per entry of `rows` from that row's weights, by one searchsorted.

    Adding the row number to each row's CDF makes the flattened CDFs one increasing
    sequence, so all draws are a single binary search.
    """
    s, k = weights.shape
    cdf = np.cumsum(weights, axis=1)
    cdf /= np.where(cdf[:, -1:] > 0, cdf[:, -1:], 1.0)
    cdf += np.arange(s)[:, None]
    pos = np.searchsorted(cdf.ravel(), rows + rng.random(rows.size) * 0.999999, side="right")
    return np.minimum(pos - rows * k, k - 1)


def _clan_moves(p: dict[str, np.ndarray], sp: np.ndarray, sd: np.ndarray, total_days: int) -> tuple[np.ndarray, np.ndarray]:
    """clan_leave / clan_join events in each player's first session on or after the day of the move."""
    key = sp * total_days + sd  # sorted: sessions are laid out player-major, day-minor
    out_sess, out_type = [], []
    for col, code in (("leave", SPECIAL.index("clan_leave")), ("rejoin", SPECIAL.index("clan_join"))):
        who = np.flatnonzero(p[col] >= 0)
        first = np.searchsorted(key, who * total_days + p[col][who])
        found = first < key.size
        found[found] = sp[first[found]] == who[found]
        out_sess.append(first[found])
        out_type.append(np.full(found.sum(), code))
    return np.concatenate(out_sess).astype(np.int64), np.concatenate(out_type).astype(np.int64)


def _values(types: np.ndarray, sess: np.ndarray, minutes: np.ndarray, whale: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:
    """event_value per event (E,), NaN where the event carries no number."""
    v = np.full(types.size, np.nan)
    code = {name: i for i, name in enumerate(EVENT_TYPES)}

    def fill(name: str, draw):  # noqa: ANN001 - small local helper
        m = types == code[name]
        v[m] = draw(m)

    fill("disconnect", lambda m: np.round(minutes[sess[m]], 1))  # session minutes
    # Heavy-tailed spending: each spender's level times a log-normal basket.
    fill("purchase", lambda m: np.round(0.99 + rng.lognormal(np.log(5) + whale[sess[m]], 1.0), 2))
    # Battles: loot when won, troops lost (negative) when lost.
    fill("battle", lambda m: np.where(rng.random(m.sum()) < 0.55, rng.lognormal(5, 1, m.sum()), -np.round(rng.lognormal(3, 0.8, m.sum()))))
    fill("raid", lambda m: rng.lognormal(6, 1, m.sum()))
    fill("upgrade_building", lambda m: rng.integers(1, 31, m.sum()).astype(float))
    fill("train_troops", lambda m: rng.integers(5, 200, m.sum()).astype(float))
    fill("collect_resources", lambda m: rng.lognormal(7, 0.8, m.sum()))
    fill("trade", lambda m: np.round(rng.normal(0, 500, m.sum())))  # bought (+) or sold (-)
    fill("quest_complete", lambda m: rng.lognormal(4, 0.5, m.sum()))
    fill("clan_war", lambda m: rng.lognormal(3, 1, m.sum()))
    fill("tutorial_step", lambda m: rng.integers(1, 11, m.sum()).astype(float))
    return v


def write_events(table: pa.Table, out: str | Path) -> Path:
    """Write atomically (temporary file beside `out`, then rename) as Parquet or CSV by suffix."""
    out = Path(out)
    suffix = out.name.lower()
    if not (suffix.endswith(".parquet") or suffix.endswith(".csv")):
        raise DataError(f"--out {out}: name the file *.parquet or *.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        if suffix.endswith(".parquet"):
            pq.write_table(table, tmp, row_group_size=BATCH_ROWS_OUT)
        else:
            plain = table.set_column(0, "id", table["id"].cast(pa.string()))
            plain = plain.set_column(2, "event_type", plain["event_type"].cast(pa.string()))
            pacsv.write_csv(plain, tmp)
    return out

