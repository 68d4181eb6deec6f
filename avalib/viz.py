"""Visualisation: where the reward is earned, token by token.

Per-token readings of any reward model (Eq. 19's mu_t with sigma_t, the Eq. 11 weights w_t, the
TD error delta_t of Eq. 14), aligned with the built-in task's gold per-token reward, and two views
of them: a matplotlib Figure and coloured HTML. Used by notebooks/ and `train_rm.py --visualize`.
"""
from __future__ import annotations

import json

from pathlib import Path

import torch

from avalib import data
from avalib.gold import gold_token_rewards


READING_LABELS = {"ava": "mu_t (Eq. 19)", "pref-trans": "r_t (Pref-Trans)",
                  "bt": "BT head at each prefix", "bt-var": "BT head at each prefix",
                  "dpo": "beta log pi/pi_ref (DPO)"}


@torch.no_grad()
def token_readings(model, tokenizer, prompt: str, responses: list[str], max_length: int = 512,
                   gold: bool = False) -> list[dict]:
    """Score responses to one prompt token by token. Per response: "tokens" (decoded, EOS last unless
    the response was cut), "rewards" (AVA: mu_t; Pref-Trans: r_t; BT: its head read at every prefix,
    which only the last one was trained for), "sigmas" and "deltas" (AVA; the last delta is None:
    the TD error needs y_{t+2}), "weights" (Eq. 11 / Pref-Trans, rescaled to mean one over the
    response), "score" (the sequence reward), "kind", "label", "eos"; AVA and BT-var add "score_sigma"
    (AVA: sigma of E[R | y] under q_phi, the sigma at the last transition or, for a return reading, the
    root of the summed sigma_t^2; BT-var: its spread v), BT and BT-var "differences" (the head's value
    after each token minus its value before it: per-token rewards that sum to the score minus the
    prompt's own value).

    Alignment: `encode` tokenises each response alone and appends EOS, so the k-th response
    transition emits the k-th token of tokenizer(response, add_special_tokens=False), which is the
    tokenisation avalib.gold.gold_token_rewards uses; gold=True adds "gold" on that grid (None on the EOS)."""
    import ava

    examples, _ = data.encode(tokenizer, prompt, responses, max_length)
    batch = data.collate(examples, tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    try:
        out = model(**batch)
    finally:
        model.train(was_training)
    if isinstance(out, ava.TQROutput):
        kind, (rewards, sigmas), score = "ava", ava.dense_rewards(out), out.sequence_reward()
        weights = out.weights[:, 1:]  # (B, T-1): mu_t is read at position t+1, so is its weight
        deltas, td_mask = ava.td_error(out.q_taken, out.mask, model.config.gamma, model.config.td_terminal)
    else:
        kind, rewards, sigmas, deltas, score = model.kind, out.rewards, None, None, out.score
        weights = None if out.weights is None else out.weights * out.mask.sum(dim=1, keepdim=True)  # sum 1 -> mean 1
    items = _reply_items(tokenizer, responses, examples, out.mask, gold, kind=kind, score=score, rewards=rewards,
                         sigmas=sigmas, weights=weights, deltas=deltas, td_mask=None if deltas is None else td_mask)
    last_sigma = out.sequence_sigma() if kind == "ava" else None
    for row, item in enumerate(items):  # what a sequence score's uncertainty is, where the model has one
        if kind == "ava":
            item["score_sigma"] = (float(last_sigma[row]) if out.reading == "last"
                                   else sum(s * s for s in item["sigmas"]) ** 0.5)
        elif kind == "bt-var":
            item["score_sigma"] = float(out.spread[row])
        if getattr(out, "levels", None) is not None:  # BT: the head's change from one prefix to the next
            positions = out.mask[row].nonzero().flatten().tolist()
            item["differences"] = [float(out.levels[row, t + 1] - out.levels[row, t]) for t in positions]
    return items


@torch.no_grad()
def implicit_token_readings(policy, reference, tokenizer, prompt: str, responses: list[str], beta: float,
                            max_length: int = 512, gold: bool = False) -> list[dict]:
    """DPO's implicit reward token by token: r_t = beta * (log pi(y_t) - log pi_ref(y_t)). A DPO policy is a
    token-level soft-Q function (Rafailov et al. 2024, "From r to Q*"), and these are its per-token rewards
    (up to a potential-based shaping); "score" is their sum over the response, EOS included: DPO's implicit
    sequence reward. The same items and alignment as `token_readings` (no sigmas, weights or deltas)."""
    import ava

    examples, _ = data.encode(tokenizer, prompt, responses, max_length)
    batch = data.collate(examples, tokenizer.pad_token_id)
    modes = policy.training, reference.training
    policy.eval(), reference.eval()
    try:
        rewards = beta * (ava.token_logprobs(policy, **batch) - ava.token_logprobs(reference, **batch))  # (B, T-1)
    finally:
        policy.train(modes[0]), reference.train(modes[1])
    return _reply_items(tokenizer, responses, examples, batch["response_mask"][:, 1:], gold, kind="dpo",
                        score=rewards.sum(dim=1), rewards=rewards)


def _reply_items(tokenizer, responses, examples, mask, gold, *, kind, score, rewards, sigmas=None, weights=None,
                 deltas=None, td_mask=None) -> list[dict]:
    """One item per response: its values at its response transitions (mask: (B, T-1)), checked to be the
    response tokenised alone (EOS last unless cut), with the gold on that grid when asked."""
    readings = []
    for row, (response, example) in enumerate(zip(responses, examples)):
        positions = mask[row].nonzero().flatten().tolist()
        ids = example["input_ids"][example["prompt_length"]:]
        text_ids = tokenizer(response, add_special_tokens=False).input_ids
        eos = len(ids) == len(text_ids) + 1  # encode appends EOS; a cut response loses it
        n_text = len(ids) - eos
        if ids[:n_text] != text_ids[:n_text] or len(positions) != len(ids):
            raise AssertionError("response tokens in the batch differ from the response tokenised alone")
        def pick(values, valid=None):  # this row's values at its response transitions; None where not valid
            return None if values is None else [float(values[row, t]) if valid is None or valid[row, t] else None
                                                for t in positions]

        item = {"kind": kind, "label": READING_LABELS[kind], "score": float(score[row]), "eos": eos,
                "tokens": [tokenizer.decode([i]) for i in ids], "rewards": pick(rewards), "sigmas": pick(sigmas),
                "weights": pick(weights), "deltas": pick(deltas, td_mask)}
        if gold:
            item["gold"] = gold_token_rewards(response, tokenizer)[:n_text] + [None] * eos
        readings.append(item)
    return readings


def _token_label(token: str) -> str:
    """A token as a tick label: whitespace made visible, long tokens shortened."""
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    text = text.strip() or "\u2423"
    return text if len(text) <= 12 else text[:11] + "\u2026"


def _values(seq) -> list[float]:
    return [float("nan") if v is None else float(v) for v in seq]


def plot_token_rewards(items: list[dict], titles: list[str] | None = None, columns: int | None = None,
                       max_tokens: int = 64):
    """A matplotlib Figure of `token_readings` items, `columns` side by side (default: all in one
    row; e.g. chosen | rejected), each with up to three panels: the reward per token (bars; AVA's
    +-sigma_t band; the gold per-token reward as diamonds on a second axis when known), the reward
    weights w_t, and TD consistency (delta_t against the band mu_t +- sigma_t that Eq. 13's
    log N(delta_t; mu_t, sigma_t) rewards it for staying in). Only the first max_tokens tokens show."""
    import numpy as np
    from matplotlib.figure import Figure

    titles = titles or [f"response {i}" for i in range(len(items))]
    columns = columns or len(items)
    groups = [items[start:start + columns] for start in range(0, len(items), columns)]
    kinds = [["reward"] + (["weights"] if any(i.get("weights") for i in g) else [])
             + (["td"] if any(i.get("deltas") for i in g) else []) for g in groups]  # panels of each row of items
    offsets = np.cumsum([0] + [len(k) for k in kinds])
    width = max(6.0, min(0.16 * max(len(i["tokens"][:max_tokens]) for i in items) + 1.5, 11.0))
    fig = Figure(figsize=(width * columns, 2.0 * offsets[-1] + 1.1 * len(groups)), layout="constrained")
    axes = fig.subplots(offsets[-1], columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()  # switched back on where something is drawn
    golds = [abs(v) for item in items for v in _values((item.get("gold") or [])[:max_tokens]) if v == v]
    gold_bound = 1.15 * max(golds, default=0.0) or 1.0
    for index, (item, title) in enumerate(zip(items, titles)):
        group, column = divmod(index, columns)
        n = min(len(item["tokens"]), max_tokens)
        x = np.arange(n)
        rewards = np.array(_values(item["rewards"][:n]))
        sigmas = None if item.get("sigmas") is None else np.array(_values(item["sigmas"][:n]))
        drawn = []
        for p, panel in enumerate(kinds[group]):
            ax = axes[offsets[group] + p, column]
            if panel == "reward":
                ax.bar(x, rewards, color=np.where(rewards >= 0, "tab:green", "tab:red"), alpha=0.8)
                if sigmas is not None:
                    ax.fill_between(x, rewards - sigmas, rewards + sigmas, step="mid", color="tab:blue", alpha=0.18,
                                    linewidth=0)
                ax.set_ylabel(item["label"], fontsize=8)
                ax.set_title(f"{title}   (sequence reward {item['score']:+.3f})", fontsize=9, loc="left")
                if item.get("gold") is not None:
                    gold = np.nan_to_num(np.array(_values(item["gold"][:n])))
                    twin = ax.twinx()
                    twin.scatter(x[gold != 0], gold[gold != 0], marker="D", s=22, color="black", zorder=3,
                                 label="gold (VADER valence)")
                    twin.set_ylim(-gold_bound, gold_bound)
                    twin.set_ylabel("gold per token", fontsize=8)
                    twin.tick_params(labelsize=7)
                    twin.legend(loc="upper right", fontsize=7, frameon=False)
            elif panel == "weights" and item.get("weights") is not None:
                ax.bar(x, _values(item["weights"][:n]), color="0.45")
                ax.axhline(1, color="tab:blue", linewidth=0.6, linestyle="--")
                ax.set_ylabel("w_t (mean 1)", fontsize=8)
            elif panel == "td" and item.get("deltas") is not None:
                if sigmas is not None:
                    ax.fill_between(x, rewards - sigmas, rewards + sigmas, step="mid", color="tab:blue", alpha=0.18,
                                    linewidth=0, label="mu_t +- sigma_t")
                ax.plot(x, rewards, color="tab:blue", linewidth=1, label="mu_t")
                ax.plot(x, _values(item["deltas"][:n]), "o", color="tab:orange", markersize=3, label="delta_t (Eq. 14)")
                ax.set_ylabel("TD", fontsize=8)
                ax.legend(loc="upper right", fontsize=7, frameon=False)
            else:
                continue
            ax.set_axis_on()
            ax.axhline(0, color="0.6", linewidth=0.6)
            ax.tick_params(labelsize=7)
            ax.set_xlim(-0.6, n - 0.4)
            ax.set_xticks(x, [])
            drawn.append(ax)
        drawn[-1].set_xticks(x, [_token_label(t) for t in item["tokens"][:n]], rotation=90, fontsize=7)
    for row in axes:  # one y scale per row of panels, so chosen and rejected compare
        shown = [ax for ax in row if ax.axison]
        if not shown:
            continue
        low, high = min(ax.get_ylim()[0] for ax in shown), max(ax.get_ylim()[1] for ax in shown)
        if any(ax.get_ylabel() == item["label"] for ax in shown for item in items):  # reward panels: symmetric,
            low, high = -max(-low, high), max(-low, high)  # so the reward's zero lines up with the gold's
        for ax in shown:
            ax.set_ylim(low, high)
    return fig


def token_rewards_html(items: list[dict], titles: list[str] | None = None, columns: int | None = None) -> str:
    """`token_readings` items as coloured text (green: positive reward, red: negative; one shared
    scale), `columns` side by side. Hovering a token shows its numbers; a token carrying a gold word
    valence is underlined in the gold's colour."""
    from html import escape

    titles = titles or [f"response {i}" for i in range(len(items))]
    columns = columns or len(items)
    scale = max((abs(r) for item in items for r in item["rewards"]), default=0.0) or 1.0

    def colour(value, strength):
        red, green = (0, 150) if value >= 0 else (210, 0)
        return f"rgba({red},{green},0,{strength:.2f})"

    cells = []
    for item, title in zip(items, titles):
        spans = []
        for t, token in enumerate(item["tokens"]):
            reward = item["rewards"][t]
            tip = [f"{item['label']}: {reward:+.4f}"]
            for key, name in (("sigmas", "sigma"), ("weights", "w"), ("deltas", "delta"), ("gold", "gold")):
                if item.get(key) is not None and item[key][t] is not None:
                    tip.append(f"{name}: {item[key][t]:+.4f}")
            gold = (item.get("gold") or [None] * len(item["tokens"]))[t]
            underline = f"border-bottom:3px solid {colour(gold, 1.0)};" if gold else ""
            text = token.replace("\n", "\u23ce\n")
            background = colour(reward, 0.75 * abs(reward) / scale)
            spans.append(f'<span title="{escape(" | ".join(tip))}" style="background:{background};{underline}">'
                         f'{escape(text)}</span>')
        cells.append(f'<td style="vertical-align:top;text-align:left;padding:6px"><b>{escape(title)}</b> '
                     f'(sequence reward {item["score"]:+.3f})<div style="font-family:monospace;white-space:pre-wrap;'
                     f'line-height:1.9">{"".join(spans)}</div></td>')
    rows = "".join(f"<tr>{''.join(cells[i:i + columns])}</tr>" for i in range(0, len(cells), columns))
    label = items[0]["label"] if items else "reward"
    legend = (f"background: {escape(label)}, green positive, red negative, full colour at |value| = {scale:.3g}; "
              "underline: a gold word valence (built-in task); hover over a token for its numbers")
    return (f'<table style="border-collapse:collapse;table-layout:fixed;width:100%">{rows}</table>'
            f'<p style="font-size:smaller">{legend}</p>')


def write_token_reward_views(model, tokenizer, rows: list[dict], directory: str | Path, max_length: int = 512,
                             gold: bool = False) -> tuple[Path, Path]:
    """Score rows (pairs: chosen | rejected side by side; demonstrations: the response) token by token
    and write directory/token_rewards.png and directory/token_rewards.html; returns both paths."""
    items, titles = [], []
    for row in rows:
        responses = [row["chosen"], row["rejected"]] if "chosen" in row else [row["response"]]
        items += token_readings(model, tokenizer, row["prompt"], responses, max_length, gold)
        where = row.get("where", "")
        titles += [f"{where} chosen", f"{where} rejected"] if "chosen" in row else [f"{where} response"]
    columns = 2 if rows and "chosen" in rows[0] else 1
    directory = Path(directory)
    png, html = directory / "token_rewards.png", directory / "token_rewards.html"
    plot_token_rewards(items, titles, columns=columns).savefig(png, dpi=90)
    html.write_text("<!doctype html>\n<meta charset=\"utf-8\"><title>Per-token rewards</title>\n"
                    + token_rewards_html(items, titles, columns=columns) + "\n", encoding="utf-8")
    return png, html


def plot_proxy_vs_gold(metrics_path: Path, out_path: Path) -> None:
    """Proxy reward (the reward model's score) and gold reward of the rollouts per update: reward hacking
    shows as the proxy rising while the gold stalls or falls."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    lines = [line for line in lines if "proxy/score" in line]
    if not lines:
        return
    x = list(range(1, len(lines) + 1))
    fig, left = plt.subplots(figsize=(6, 3.5))
    left.plot(x, [line["proxy/score"] for line in lines], color="tab:blue", label="proxy (reward model)")
    left.set_xlabel("PPO update")
    left.set_ylabel("proxy reward", color="tab:blue")
    if "gold/score" in lines[0]:
        right = left.twinx()
        right.plot(x, [line["gold/score"] for line in lines], color="tab:orange", label="gold")
        right.set_ylabel("gold reward", color="tab:orange")
    left.set_title("Rollout reward per update: proxy vs gold")
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
