"""A seeded, vectorised generator of non-contractual retail purchase logs.

A web shop's customers never say that they leave: they just stop buying. The
textbook model of such logs is BG/NBD (Fader, Hardie & Lee 2005, "Counting your
customers the easy way") with the Gamma-Gamma model of spend; both were fitted
to CDNOW, a CD shop's log, and those published fits are the defaults here:

- purchase rate: while "alive" a customer buys as a Poisson process with rate
  lambda ~ Gamma(r=0.243, alpha=4.414 weeks). The shape r < 1 makes most rates
  tiny and a few large, so most customers buy a handful of times and a few buy
  every week (mean rate 0.055 a week, 2.9 a year while alive; median far lower).
- dropout: after each repeat purchase a customer becomes inactive for good with
  probability p ~ Beta(a=0.793, b=2.426) (mean 0.25). Nobody sees the moment:
  a quiet customer may be gone or just slow, which is why churn is only partly
  predictable (a boosted baseline on a real log: AUC ~0.77). As in BG/NBD, the
  first purchase does not end a customer's life; the first repeat purchase can.
- spend: a customer's transactions are Gamma(p=6.25, nu) with the customer's
  nu ~ Gamma(q=3.74, gamma=15.44): mean basket 35 (CDNOW dollars), each
  customer with their own typical basket, heavy-tailed across customers.

Acquisition (the first purchase) is spread uniformly from `history_days` (365)
before the log starts to its end, as in a shop that opened a year before the
extract: customers bought before day 0 appear with their history cut at day 0,
new ones appear at their first purchase, and those acquired after the cut-off
have no event in the observation window (prepare leaves them out, as it would
any newcomer). Old customers who lapsed before the log but still open a
newsletter or visit are in it without a purchase; prepare keeps them (they have
events to score) and most are churners, as in a real CRM export. `customers`
counts the customers with at least one event in the log; candidates with none
(acquired before the log and gone before it) are drawn and dropped in whole
batches. 546 days (273 + 273) are CDNOW's 78 weeks.

Beside purchases, three event types a shop's CRM export holds:

- `visit` (value: products viewed): every purchase happens in a visit, and an
  alive customer also browses without buying, at lambda * (1 - c) / c with a
  per-customer conversion c ~ Beta(3, 3) (on average 1.5 visits without a
  purchase per purchase: only visits of logged-in customers are attributed).
  A lapsed customer still drops by, at `lapsed_browse` (0.2) of that rate.
- `return` (value: the refund): each purchase is returned with the customer's
  probability ~ Beta(1, 9) (10% on average, retail's usual), 2-60 days later,
  in full (60%) or in part.
- `email_open` (no value): a newsletter every other Thursday goes to the 60% who
  subscribed; each opens it with their own probability ~ Beta(0.5, 3) (mean
  14%, most rarely), a lapsed customer at `lapsed_open` (0.3) of it.

With the 273 + 273 days default the log is as sparse as CDNOW's: 99.5% of the
observation window's customer-days hold no purchase, 98.3% no event at all
(seed 7; prepare with --session-type purchase --min-sessions 1
--observation-days 273 --label-days 273 --min-active-days 0 gives a churn rate
of 0.65 among the customers who bought in the window, 0.71 among all kept).

Time of day follows a shop's daily profile; there is no weekly or yearly
seasonality. Everything is numpy on whole arrays: per candidate [M], per
potential purchase [P], per visit [V], per subscriber x newsletter [S, C]; the
only Python loop runs over batches of candidates.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from models.events import DAY_S
from models.generate import START_UNIX_S
from models.errors import DataError

log = logging.getLogger(__name__)

EVENT_TYPES = ("purchase", "visit", "return", "email_open")
PURCHASE, VISIT, RETURN, EMAIL_OPEN = range(len(EVENT_TYPES))
NEWSLETTER_WEEKDAY = 3  # day 0 (2024-01-01) is a Monday: newsletters go out on Thursdays
NEWSLETTER_EVERY_DAYS = 14  # weekly sends left only 97.8% of the window's customer-days empty (98.3% now)

# Share of shop visits starting in each UTC hour: quiet at night, a lunch bump, an evening peak.
HOUR_WEIGHTS = np.array([1, 0.5, 0.3, 0.3, 0.3, 0.5, 1, 2, 3, 4, 5, 5, 6, 6, 5, 5, 5, 6, 7, 8, 9, 9, 6, 3], float)


@dataclass(frozen=True)
class RetailConfig:
    customers: int  # customers with at least one event in the log
    days: int = 273  # observation days before the cut-off (9 months)
    label_days: int = 273  # days after it: 546 days = 78 weeks, CDNOW's span
    seed: int = 0
    history_days: int = 365  # acquisitions start this long before the log: old and new customers in it
    # BG/NBD fitted to CDNOW (Fader, Hardie & Lee 2005); alpha is in days (4.414 weeks).
    r: float = 0.243
    alpha_days: float = 4.414 * 7
    a: float = 0.793
    b: float = 2.426
    # Gamma-Gamma spend fitted to CDNOW (Fader, Hardie & Lee 2005; Fader & Hardie 2013).
    spend_p: float = 6.25
    spend_q: float = 3.74
    spend_gamma: float = 15.44
    conversion: tuple[float, float] = (3.0, 3.0)  # Beta of the share of visits with a purchase
    lapsed_browse: float = 0.2  # browse rate after dropout, relative to before
    return_prob: tuple[float, float] = (1.0, 9.0)  # Beta of the share of purchases returned
    full_return_share: float = 0.6  # returns that refund the whole basket
    subscribed_share: float = 0.6  # customers on the newsletter list
    open_prob: tuple[float, float] = (0.5, 3.0)  # Beta of the chance to open a newsletter
    lapsed_open: float = 0.3  # open chance after dropout, relative to before


def check_config(cfg: RetailConfig) -> None:
    for option, value in (("--players", cfg.customers), ("--observation-days", cfg.days), ("label days", cfg.label_days)):
        if value < 1:
            raise DataError(f"{option} {value}: must be at least 1")
    if cfg.history_days < 0:
        raise DataError(f"history days {cfg.history_days}: must be 0 or more")
    positive = (cfg.r, cfg.alpha_days, cfg.a, cfg.b, cfg.spend_p, cfg.spend_q, cfg.spend_gamma,
                *cfg.conversion, *cfg.return_prob, *cfg.open_prob)
    if min(positive) <= 0:
        raise DataError("BG/NBD, Gamma-Gamma and Beta parameters must be positive")
    if cfg.spend_q <= 1:
        raise DataError(f"spend q {cfg.spend_q}: must exceed 1 for the mean basket to be finite")
    shares = (cfg.lapsed_browse, cfg.full_return_share, cfg.subscribed_share, cfg.lapsed_open)
    if not all(0.0 <= s <= 1.0 for s in shares):
        raise DataError("lapsed_browse, full_return_share, subscribed_share and lapsed_open must be in [0, 1]")


def generate_retail_events(cfg: RetailConfig) -> pa.Table:
    """Columns id (dictionary string), timestamp (int64 s), event_type (dictionary string), event_value (float64).

    event_value is null for email_open. Same columns, day 0 and writer (`write_events`) as the MMO log.
    """
    check_config(cfg)
    rng = np.random.default_rng(cfg.seed)
    total_days = cfg.days + cfg.label_days
    visible_share = total_days / (total_days + cfg.history_days)  # at least: everyone acquired inside the log
    batch = int(cfg.customers / visible_share * 1.1) + 64
    parts: list[tuple[np.ndarray, ...]] = []
    kept = 0
    while kept < cfg.customers:  # one pass almost always; a second only for tiny logs
        cust, t, offset_s, etype, value = _simulate(cfg, batch, rng)
        inside = (t >= 0) & (t < total_days)
        visible = np.flatnonzero(np.bincount(cust[inside], minlength=batch) > 0)[: cfg.customers - kept]
        new_id = np.full(batch, -1, np.int64)
        new_id[visible] = kept + np.arange(visible.size)
        sel = inside & (new_id[cust] >= 0)
        parts.append((new_id[cust[sel]], t[sel], offset_s[sel], etype[sel], value[sel]))
        kept += visible.size
    cust, t, offset_s, etype, value = (np.concatenate(cols) for cols in zip(*parts))
    ts = START_UNIX_S + _seconds(t) + offset_s
    np.minimum(ts, START_UNIX_S + total_days * DAY_S - 1, out=ts)  # a visit near the end may not run past the log
    log.debug("%d customers (%d candidate batches), %d events", kept, len(parts), ts.size)

    order = np.argsort(ts, kind="stable")  # logs come sorted by time
    width = len(str(cfg.customers - 1))
    ids = pa.array(np.char.add("cust_", np.char.zfill(np.arange(cfg.customers).astype(str), width)))
    return pa.table({
        "id": pa.DictionaryArray.from_arrays(pa.array(cust[order].astype(np.int32)), ids),
        "timestamp": pa.array(ts[order]),
        "event_type": pa.DictionaryArray.from_arrays(pa.array(etype[order].astype(np.int32)), pa.array(EVENT_TYPES)),
        "event_value": pa.array(value[order], from_pandas=True),  # NaN -> null
    })


def _seconds(t: np.ndarray) -> np.ndarray:
    """Float days since day 0 -> int64 seconds; the time of day is bent to HOUR_WEIGHTS.

    The map is monotone inside each day, so the order of a customer's events is kept.
    """
    day = np.floor(t)
    cdf = np.concatenate([[0.0], np.cumsum(HOUR_WEIGHTS) / HOUR_WEIGHTS.sum()])
    sec = np.interp(t - day, cdf, np.arange(25) * 3600.0)
    return day.astype(np.int64) * DAY_S + np.minimum(sec.astype(np.int64), DAY_S - 1)


def _simulate(cfg: RetailConfig, m: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Events of m candidate customers: (cust, t in days, offset s, type, value), before and inside the log."""
    total_days = cfg.days + cfg.label_days
    acq = rng.uniform(-cfg.history_days, total_days, m)  # (M,) day of the first purchase
    lam = rng.gamma(cfg.r, 1.0 / cfg.alpha_days, m)  # purchases per day while alive
    p_drop = np.clip(rng.beta(cfg.a, cfg.b, m), 1e-12, 1.0)
    k_last = rng.geometric(p_drop)  # (M,) the repeat purchase after which the customer drops out
    nu = rng.gamma(cfg.spend_q, 1.0 / cfg.spend_gamma, m)  # Gamma-Gamma: baskets ~ Gamma(p, rate nu)

    # Repeat purchases: a Poisson process from acquisition to the end of the log,
    # cut after the k-th point. Given their number, Poisson points are uniform.
    span = total_days - acq
    n_pts = rng.poisson(lam * span)  # (M,)
    pc = np.repeat(np.arange(m), n_pts)  # (P,) sorted by customer
    pt = acq[pc] + rng.random(pc.size) * span[pc]
    order = np.lexsort((pt, pc))
    pt = pt[order]
    first = np.cumsum(n_pts) - n_pts
    rank = np.arange(pc.size) - first[pc]
    bought = rank < k_last[pc]
    death = np.full(m, np.inf)  # (M,) day of the dropout; inf = alive at the end of the log
    dies = n_pts >= k_last
    death[dies] = pt[first[dies] + k_last[dies] - 1]

    buy_c = np.concatenate([np.arange(m), pc[bought]])  # first purchase, then the repeats
    buy_t = np.concatenate([acq, pt[bought]])
    amount = np.maximum(0.01, np.round(rng.gamma(cfg.spend_p, 1.0 / nu[buy_c]), 2))

    # Visits: one per purchase (the purchase follows 3-45 minutes into it), and
    # browsing without a purchase, at a lower rate once the customer has lapsed.
    conv = np.maximum(rng.beta(*cfg.conversion, m), 1e-6)
    browse = lam * (1.0 - conv) / conv  # (M,) visits without a purchase per day while alive
    lo = np.maximum(acq, 0.0)
    alive_end = np.minimum(death, total_days)
    seg_lo = np.concatenate([lo, np.maximum(death[dies], lo[dies])])  # alive, then lapsed segments
    seg_hi = np.concatenate([alive_end, np.full(dies.sum(), float(total_days))])
    seg_c = np.concatenate([np.arange(m), np.flatnonzero(dies)])
    seg_rate = np.concatenate([browse, cfg.lapsed_browse * browse[dies]])
    n_browse = rng.poisson(seg_rate * np.maximum(seg_hi - seg_lo, 0.0))
    bc = np.repeat(seg_c, n_browse)
    bseg = np.repeat(np.arange(seg_c.size), n_browse)
    bt = seg_lo[bseg] + rng.random(bc.size) * (seg_hi - seg_lo)[bseg]
    views = np.concatenate([2 + rng.poisson(5.0, buy_c.size), 1 + rng.poisson(3.0, bc.size)]).astype(float)
    buy_offset = rng.integers(3 * 60, 45 * 60, buy_c.size)

    # Returns: a share of baskets comes back 2-60 days later, in full or in part.
    ret_p = rng.beta(*cfg.return_prob, m)
    ret = rng.random(buy_c.size) < ret_p[buy_c]
    rc, rt = buy_c[ret], buy_t[ret] + np.minimum(60.0, 2.0 + rng.lognormal(np.log(8.0), 0.7, ret.sum()))
    part = np.where(rng.random(rc.size) < cfg.full_return_share, 1.0, rng.uniform(0.2, 0.9, rc.size))
    refund = np.maximum(0.01, np.round(amount[ret] * part, 2))

    # Newsletter opens: subscribers x the sends after their acquisition.
    sends = np.arange(NEWSLETTER_WEEKDAY, total_days, NEWSLETTER_EVERY_DAYS, dtype=float)  # (C,)
    subs = np.flatnonzero(rng.random(m) < cfg.subscribed_share)  # (S,)
    p_open = rng.beta(*cfg.open_prob, m)[subs][:, None]  # (S, 1)
    p_open = p_open * np.where(sends[None, :] < death[subs][:, None], 1.0, cfg.lapsed_open)  # (S, C)
    opened = (sends[None, :] > acq[subs][:, None]) & (rng.random(p_open.shape) < p_open)
    oi, oj = np.nonzero(opened)
    ec, et = subs[oi], sends[oj] + rng.exponential(0.5, oi.size)  # most open within a day

    cust = np.concatenate([buy_c, buy_c, bc, rc, ec])
    t = np.concatenate([buy_t, buy_t, bt, rt, et])
    offset = np.concatenate([buy_offset, np.zeros(buy_c.size + bc.size + rc.size + ec.size, np.int64)])
    etype = np.repeat([PURCHASE, VISIT, VISIT, RETURN, EMAIL_OPEN], [buy_c.size, buy_c.size, bc.size, rc.size, ec.size])
    value = np.concatenate([amount, views, refund, np.full(ec.size, np.nan)])
    return cust, t, offset, etype, value
