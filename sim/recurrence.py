"""The exact fast timeline: sim/engine.py's fluid model stepped without SimPy, with closed forms where layers repeat.

Without `layer_kinds` every layer of a step has the same durations (StepPlan holds per-step arrays), so a
run of layers in one regime has a closed form; the rest is the engine's own fluid, event by event, in plain
Python. A hybrid plan (`layer_kinds`: full-attention layers copy, sliding ones do not) is walked layer by
layer, event by event, with no jump (its runs of identical layers are short: 1 in gpt-oss, 5 in Gemma 3);
only its steps with nothing beside them keep a closed form (`full`, `evict-only`, `prefetch-sync`, and
copies on the compute stream sum the step's layers). Its `cpu-attention` takes SimPy.

- a plan that copies nothing (`full`, `evict-only`, any plan whose copies are all zero): each step is
  layers x layer + head, back to back (numpy, no loop);
- otherwise three lanes, as in the engine: compute (its rate the product of the slow-down factors of the
  copies beside it), H2D and D2H (one copy each at a time, at the duplex rate while the other direction
  copies). Events are taken one at a time, except inside a step of `prefetch-layer` with no demotion in
  flight, where whole runs of identical layers are jumped over in one of two regimes:
  copy-bound (layer l computes at w / f beside copy l + 1 and waits for it: period c) and
  compute-bound (the copy `buffers - 1` layers ahead runs beside the first c of compute: period
  w + c (1 - f)). With `serial_copies` or before the forward pass (`prefetch-sync`), a step with no
  demotion in flight is layers x (c + w) + head.

`cpu-attention` of a hybrid plan, bulk H2D copies (only `cpu-attention` plans have them) and a single staging
buffer take SimPy (sim/engine.py), which stays the reference model: tests/test_recurrence.py checks the two equal,
field by field, on random plans of every strategy.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from tiersim.sim import engine
from tiersim.sim.engine import StepPlan, Timeline

_INF = float("inf")
_RESIDENT, _SYNC, _SERIAL, _LAYER = range(4)
_WAIT, _LAYER_RUN, _HEAD, _COPY, _DONE = range(5)  # what the compute stream is doing


def covers(plan: StepPlan) -> bool:
    """Whether `run` takes this plan (otherwise sim/engine.py's SimPy model does)."""
    s = plan.strategy
    if s.host_attends:
        return plan.layer_kinds is None  # a hybrid plan's cpu-attention layers: SimPy
    if np.any(plan.h2d_bulk_s > 0):  # the engine starts these for any strategy; only cpu-attention plans have them
        return False
    return not (s.fetches_per_layer and not plan.serial_copies and s.staging_buffers(plan.depth, plan.layers) < 2)


def is_quiet(plan: StepPlan) -> bool:
    """No copy of any kind in any step (the engine's `quiet`: nothing can slow compute down)."""
    p = plan
    return not any(np.any(a > 0) for a in (p.h2d_layer_s, p.h2d_bulk_s, p.d2h_bulk_s, p.query_d2h_s, p.partial_h2d_s))


def timeline(plan: StepPlan) -> Timeline:
    """The plan's timeline: from the recurrence where it covers the plan, from SimPy otherwise (`engine` says which)."""
    return run(plan) if covers(plan) else engine.run(plan)


def run(plan: StepPlan) -> Timeline:
    """The timeline engine.run would give for a plan that `covers` takes (equal within rounding)."""
    if not covers(plan):
        raise ValueError(f"the recurrence does not cover {plan.strategy.name} with this plan; use engine.run")
    tl = Timeline.empty(plan.steps)
    compute = plan.step_compute_s
    if plan.strategy.host_attends:
        tl.events = _fluid_host(plan, tl)
    elif is_quiet(plan):
        tl.end_s[:] = np.cumsum(compute)
        tl.start_s[1:] = tl.end_s[:-1]
        tl.events = plan.steps
    else:
        tl.events = _fluid(plan, tl)
    tl.compute_s[:] = compute
    tl.engine = "recurrence"
    return tl


def _fluid(p: StepPlan, tl: Timeline) -> int:
    """The engine's processes as one event loop over three fluid lanes; returns the events taken."""
    s, L, n = p.strategy, p.layers, p.steps
    mode = (_LAYER if not p.serial_copies else _SERIAL) if s.fetches_per_layer else \
        _SYNC if s.fetches_before_forward else _RESIDENT
    B = s.staging_buffers(p.depth, L)
    total = L * n
    w_, h_ = p.layer_s.tolist(), p.head_s.tolist()
    c_, cd_ = p.h2d_layer_s.tolist(), p.h2d_layer_duplex_s.tolist()
    # Per layer: its kind's row (one row, the mean layer, without layer_kinds). Hybrid plans go event by event.
    patterned = p.layer_kinds is not None
    kinds, W, C, CD = p.kind_rows()
    W, C, CD = W.tolist(), C.tolist(), CD.tolist()
    body_ = [L * w for w in w_] if not patterned else [sum(W[q][k] for q in kinds) for k in range(n)]
    d_, dd_ = p.d2h_bulk_s.tolist(), p.d2h_bulk_duplex_s.tolist()
    ones = [1.0] * n
    fs_ = ones if p.h2d_layer_slow is None else p.h2d_layer_slow.tolist()
    ds_ = ones if p.d2h_bulk_slow is None else p.d2h_bulk_slow.tolist()
    start, end, stall = tl.start_s, tl.end_s, tl.stall_s
    h2d_busy, d2h_busy, d2h_done, interf = tl.h2d_busy_s, tl.d2h_busy_s, tl.d2h_done_s, tl.interference_s
    start_l, stall_l, hb_l, interf_l = [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n  # Python floats in the loop

    now, events = 0.0, 0
    # compute lane
    c_phase, c_left, c_work, c_start, c_step = _WAIT, 0.0, 0.0, 0.0, 0
    cl, computed, wait_since, j_in_step = 0, 0, 0.0, 0  # cl: next global layer; j_in_step: for _SERIAL
    # H2D lane (the copy stream in _LAYER; the compute stream's own copy otherwise)
    h_on, h_left, h_dup, h_slow, h_step, h_start = False, 0.0, 1.0, 1.0, 0, 0.0
    hl, staged = 0, 0
    # D2H lane: demotions, first come first served
    d_on, d_left, d_dup, d_slow, d_step, d_start = False, 0.0, 1.0, 1.0, 0, 0.0
    queue: deque[int] = deque()

    def duplex(plain: float, dup: float) -> float:
        return plain / dup if dup > 0 else 1.0

    # The first step starts at 0.
    k = 0
    if mode == _LAYER:
        c_phase = _WAIT
    else:
        c_phase = _DONE  # set by the step start below
    pending_step_start = mode != _LAYER

    while True:
        # -- instantaneous moves: whatever can start now starts ---------------------------------------
        if pending_step_start:  # _RESIDENT, _SYNC, _SERIAL: step k starts now (k < n)
            pending_step_start = False
            start_l[k] = now
            if mode == _RESIDENT:
                c_phase, c_left, c_work, c_start, c_step = _LAYER_RUN, body_[k] + h_[k], body_[k] + h_[k], now, k
            elif mode == _SYNC:
                if c_[k] > 0:
                    c_phase = _COPY
                    h_on, h_left, h_dup, h_slow, h_step, h_start = True, c_[k], duplex(c_[k], cd_[k]), 1.0, k, now
                else:
                    c_phase, c_left, c_work, c_start, c_step = _LAYER_RUN, body_[k] + h_[k], body_[k] + h_[k], now, k
            else:
                j_in_step = 0
                c_phase = _WAIT  # the layer loop below
        if mode == _SERIAL and c_phase == _WAIT:  # layer j_in_step of step k: its copy, then its compute
            if not d_on:  # nothing beside: the rest of the step in closed form
                if patterned:
                    rest = kinds[j_in_step:]
                    cc = sum(C[q][k] for q in rest)
                    now += cc + sum(W[q][k] for q in rest) + h_[k]
                else:
                    left = L - j_in_step
                    cc = left * c_[k]
                    now += left * (c_[k] + w_[k]) + h_[k]
                stall_l[k] += cc
                hb_l[k] += cc
                events += 1
                end[k] = now
                k = _step_end(k, now, d_, queue)
                if queue:  # D2H was idle
                    d_on, d_left, d_dup, d_slow, d_step, d_start = _start_d2h(queue, d_, dd_, ds_, now)
                if k < n:
                    pending_step_start = True
                    continue
                c_phase = _DONE
            elif C[kinds[j_in_step]][k] > 0:
                q = kinds[j_in_step]
                c_phase, wait_since = _COPY, now
                h_on, h_left, h_dup, h_slow, h_step, h_start = True, C[q][k], duplex(C[q][k], CD[q][k]), 1.0, k, now
            else:
                w = W[kinds[j_in_step]][k]
                c_phase, c_left, c_work, c_start, c_step = _LAYER_RUN, w, w, now, k
        if mode == _LAYER:
            while not h_on and hl < total and computed >= hl - B + 1:  # the copy stream: next layer, buffer free
                hk, q = hl // L, kinds[hl % L]
                if C[q][hk] > 0:
                    h_on, h_left, h_dup, h_slow, h_step, h_start = True, C[q][hk], duplex(C[q][hk], CD[q][hk]), \
                        fs_[hk], hk, now
                else:
                    staged += 1
                    hl += 1
            if c_phase == _WAIT and staged > cl:
                k = cl // L
                stall_l[k] += now - wait_since
                w = W[kinds[cl % L]][k]
                c_phase, c_left, c_work, c_start, c_step = _LAYER_RUN, w, w, now, k
                if not patterned and not d_on and not queue and cl % L < L - 1:
                    jumped = _jump(cl, hl, h_on, h_start == now, L, B, w_[k], c_[k], fs_[k])
                    if jumped:
                        m, kind = jumped
                        w, cc, f = w_[k], c_[k], fs_[k]
                        events += 1
                        if kind == 0:  # copy-bound: computes cl..cl+m-1, copies cl+1..cl+m
                            now += m * cc
                            interf_l[k] += m * (w / f - w)
                            stall_l[k] += m * (cc - w / f)
                            hb_l[k] += m * cc
                            computed, cl, staged, hl, h_on = cl + m, cl + m, cl + m + 1, cl + m + 1, False
                        else:  # compute-bound: computes cl..cl+m-1 beside copies hl..hl+m-1 (cc may be 0)
                            period = w + cc * (1.0 - f) if cc > 0 else w
                            now += m * period
                            interf_l[k] += m * (period - w)
                            hb_l[k] += m * cc
                            computed, cl = cl + m, cl + m
                            if cc > 0:
                                staged, hl, h_on = hl + m, hl + m, False
                            else:
                                staged, hl = hl + m - 1, hl + m - 1
                        c_phase, wait_since = _WAIT, now
                        continue

        # -- the next event: whichever running job finishes first ---------------------------------------
        rh = h_dup if d_on else 1.0
        rd = d_dup if h_on else 1.0
        rc = (h_slow if h_on else 1.0) * (d_slow if d_on else 1.0)
        tc = (c_left if c_left > 0 else 0.0) / rc if c_phase in (_LAYER_RUN, _HEAD) and rc > 0 else _INF
        th = (h_left if h_left > 0 else 0.0) / rh if h_on else _INF
        td = (d_left if d_left > 0 else 0.0) / rd if d_on else _INF
        dt = min(tc, th, td)
        if dt == _INF:
            break
        events += 1
        now += dt
        if c_phase in (_LAYER_RUN, _HEAD):
            c_left -= dt * rc
        if h_on:
            h_left -= dt * rh
        if d_on:
            d_left -= dt * rd

        if dt == td:  # a demotion finished; the next in line starts
            d2h_busy[d_step] += now - d_start
            d2h_done[d_step] = now
            d_on = False
            if queue:
                d_on, d_left, d_dup, d_slow, d_step, d_start = _start_d2h(queue, d_, dd_, ds_, now)
        elif dt == th:  # an H2D copy finished
            h_on = False
            if mode == _LAYER:
                hb_l[h_step] += now - h_start
                staged += 1
                hl += 1
            else:
                hb_l[h_step] += now - h_start
                if mode == _SYNC:
                    stall_l[k] = now - start_l[k]
                    c_phase, c_left, c_work, c_start, c_step = _LAYER_RUN, body_[k] + h_[k], body_[k] + h_[k], now, k
                else:  # _SERIAL: the layer's own copy done; its compute
                    stall_l[k] += now - wait_since
                    w = W[kinds[j_in_step]][k]
                    c_phase, c_left, c_work, c_start, c_step = _LAYER_RUN, w, w, now, k
        else:  # compute finished a layer, a head or (resident, sync) a whole step
            elapsed = now - c_start
            if elapsed > c_work:
                interf_l[c_step] += elapsed - c_work
            step_over = False
            if mode == _LAYER:
                if c_phase == _LAYER_RUN:
                    computed += 1
                    cl += 1
                    if cl % L == 0:
                        c_phase, c_left, c_work, c_start = _HEAD, h_[k], h_[k], now
                    else:
                        c_phase, wait_since = _WAIT, now
                else:
                    step_over = True
            elif mode == _SERIAL:
                if c_phase == _LAYER_RUN:
                    j_in_step += 1
                    if j_in_step == L:
                        c_phase, c_left, c_work, c_start = _HEAD, h_[k], h_[k], now
                    else:
                        c_phase = _WAIT
                else:
                    step_over = True
            else:
                step_over = True
            if step_over:
                end[k] = now
                k = _step_end(k, now, d_, queue)
                if not d_on and queue:
                    d_on, d_left, d_dup, d_slow, d_step, d_start = _start_d2h(queue, d_, dd_, ds_, now)
                if k < n:
                    if mode == _LAYER:
                        c_phase, wait_since = _WAIT, now
                    else:
                        pending_step_start = True
                else:
                    c_phase = _DONE
    if mode == _LAYER:
        start_l[1:] = end[:-1].tolist()
    start[:] = start_l
    stall[:] = stall_l
    h2d_busy[:] = hb_l
    interf[:] = interf_l
    return events


def _step_end(k: int, now: float, d_: list, queue: deque) -> int:
    """Step k is over: its demotions join the D2H queue; returns the next step."""
    if d_[k] > 0:
        queue.append(k)
    return k + 1


def _start_d2h(queue: deque, d_: list, dd_: list, ds_: list, now: float) -> tuple:
    """The first demotion in line starts on the free D2H stream."""
    k = queue.popleft()
    return True, d_[k], (d_[k] / dd_[k] if dd_[k] > 0 else 1.0), ds_[k], k, now


def _jump(cl: int, hl: int, h_on: bool, h_fresh: bool, L: int, B: int, w: float, cc: float, f: float) -> tuple[int, int] | None:
    """Layers of this step that repeat one regime from now on (compute just started layer `cl`, no demotion in
    flight, `h_fresh`: the copy of layer `hl` started just now too): (how many, 0 copy-bound | 1 compute-bound), or
    None. Only runs inside the step are jumped over."""
    last = (cl // L + 1) * L - 1
    if h_on and h_fresh and hl == cl + 1 and f > 0 and w <= cc * f:  # the copy is slower: compute waits for each layer's copy
        return (last - cl, 0) if last > cl else None
    if h_on and h_fresh and hl == cl + B - 1 and hl <= last and cc * f <= w:  # compute is slower: copies wait for buffers
        return (last - hl + 1, 1)
    if not h_on and cc == 0 and hl == cl + B and hl <= last + 1:  # nothing to copy in this step
        m = last - hl + 2
        return (m, 1) if m >= 1 else None
    return None


_PRE, _ATT, _WAITHOST, _REST = 10, 11, 12, 13  # cpu-attention's layer: projections, GPU attention, wait, the rest
_BULK, _QUERY, _PARTIAL = range(3)  # what a copy on a cpu-attention link carries
_IDLE, _QWAIT, _HOSTRUN, _PWAIT = range(4)  # the host


def _fluid_host(p: StepPlan, tl: Timeline) -> int:
    """`cpu-attention`: the engine's GPU, host and link processes as one event loop; returns the events taken.

    Both links serve their copies first come first served (the engine's one-at-a-time Resource): the queries
    share D2H with the demotions, the partial results share H2D with the promotions. A layer that starts with
    both links and the host idle and nothing queued runs the rest of its step in closed form: each layer is
    projections + max(GPU attention, query + host attention + partials) + the rest, nothing beside it.
    """
    L, n = p.layers, p.steps
    mm, att, head = p.matmul_s.tolist(), p.attention_s.tolist(), p.head_s.tolist()
    pre_ = [m * p.qkv_share for m in mm]
    rest_ = [m - pr for m, pr in zip(mm, pre_)]
    q_, H_, pa_ = p.query_d2h_s.tolist(), p.host_attention_s.tolist(), p.partial_h2d_s.tolist()
    ones = [1.0] * n
    hb_, hbd_ = p.h2d_bulk_s.tolist(), p.h2d_bulk_duplex_s.tolist()
    d_, dd_ = p.d2h_bulk_s.tolist(), p.d2h_bulk_duplex_s.tolist()
    hbs_ = ones if p.h2d_bulk_slow is None else p.h2d_bulk_slow.tolist()
    ds_ = ones if p.d2h_bulk_slow is None else p.d2h_bulk_slow.tolist()
    start_l, end_l, stall_l, interf_l = [0.0] * n, [0.0] * n, [0.0] * n, [0.0] * n
    hbusy, dbusy, host_busy, d2h_done = [0.0] * n, [0.0] * n, [0.0] * n, tl.d2h_done_s

    def link_job(kind: int, k: int, plain: list, dup: list, slow: list, small: list) -> tuple:
        if kind == _BULK:
            return plain[k], (plain[k] / dup[k] if dup[k] > 0 else 1.0), slow[k]
        return small[k], 1.0, 1.0  # the engine charges queries and partials their plain time either way

    now, events = 0.0, 0
    k = j = 0
    g_phase, g_left, g_work, g_start, wait_since, ready = _PRE, pre_[0], pre_[0], 0.0, 0.0, 0
    to_host: deque[int] = deque()
    host, host_k, host_end = _IDLE, 0, 0.0
    h_on, h_left, h_dup, h_slow, h_step, h_start, h_kind = False, 0.0, 1.0, 1.0, 0, 0.0, _BULK
    d_on, d_left, d_dup, d_slow, d_step, d_start, d_kind = False, 0.0, 1.0, 1.0, 0, 0.0, _BULK
    hq: deque[tuple[int, int]] = deque()
    dq: deque[tuple[int, int]] = deque()
    while True:
        # -- instantaneous moves ----------------------------------------------------------------------------
        if host == _IDLE and to_host:
            host, host_k = _QWAIT, to_host.popleft()
            dq.append((_QUERY, host_k))
        if not h_on and hq:
            h_kind, h_step = hq.popleft()
            h_left, h_dup, h_slow = link_job(h_kind, h_step, hb_, hbd_, hbs_, pa_)
            h_on, h_start = True, now
        if not d_on and dq:
            d_kind, d_step = dq.popleft()
            d_left, d_dup, d_slow = link_job(d_kind, d_step, d_, dd_, ds_, q_)
            d_on, d_start = True, now
        if g_phase == _WAITHOST and ready:
            ready -= 1
            stall_l[k] += now - wait_since
            g_phase, g_left, g_work, g_start = _REST, rest_[k], rest_[k], now
        if g_phase == _PRE and g_start == now and g_left == g_work and not (h_on or d_on or hq or dq or to_host
                                                                             or ready) and host == _IDLE:
            m = L - j  # nothing beside or queued: the rest of the step in closed form
            q, H, pa, a = q_[k], H_[k], pa_[k], att[k]
            now += m * (pre_[k] + max(a, q + H + pa) + rest_[k])
            stall_l[k] += m * max(0.0, q + H + pa - a)
            hbusy[k] += m * pa
            dbusy[k] += m * q
            host_busy[k] += m * H
            events += 1
            j = L
            g_phase, g_left, g_work, g_start = _HEAD, head[k], head[k], now

        # -- the next event ---------------------------------------------------------------------------------
        rh = h_dup if d_on else 1.0
        rd = d_dup if h_on else 1.0
        rc = (h_slow if h_on else 1.0) * (d_slow if d_on else 1.0)
        tc = (g_left if g_left > 0 else 0.0) / rc if g_phase not in (_WAITHOST, _DONE) and rc > 0 else _INF
        th = (h_left if h_left > 0 else 0.0) / rh if h_on else _INF
        td = (d_left if d_left > 0 else 0.0) / rd if d_on else _INF
        tH = host_end - now if host == _HOSTRUN else _INF
        dt = min(tc, th, td, tH)
        if dt == _INF:
            break
        events += 1
        if dt == tH:
            now = host_end
        else:
            now += dt
        if g_phase not in (_WAITHOST, _DONE):
            g_left -= dt * rc
        if h_on:
            h_left -= dt * rh
        if d_on:
            d_left -= dt * rd

        if dt == td:
            d_on = False
            dbusy[d_step] += now - d_start
            if d_kind == _BULK:
                d2h_done[d_step] = now
            else:  # the query is on the host: it attends
                host, host_end = _HOSTRUN, now + H_[host_k]
        elif dt == th:
            h_on = False
            hbusy[h_step] += now - h_start
            if h_kind == _PARTIAL:
                ready += 1
                host = _IDLE
        elif dt == tH:
            host_busy[host_k] += H_[host_k]
            host = _PWAIT
            hq.append((_PARTIAL, host_k))
        else:
            elapsed = now - g_start
            if elapsed > g_work:
                interf_l[k] += elapsed - g_work
            if g_phase == _PRE:
                to_host.append(k)
                g_phase, g_left, g_work, g_start = _ATT, att[k], att[k], now
            elif g_phase == _ATT:
                g_phase, wait_since = _WAITHOST, now
            elif g_phase == _REST:
                j += 1
                if j < L:
                    g_phase, g_left, g_work, g_start = _PRE, pre_[k], pre_[k], now
                else:
                    g_phase, g_left, g_work, g_start = _HEAD, head[k], head[k], now
            else:  # the head: step k is over; its re-tier traffic goes out
                end_l[k] = now
                if hb_[k] > 0:
                    hq.append((_BULK, k))
                if d_[k] > 0:
                    dq.append((_BULK, k))
                k += 1
                if k < n:
                    start_l[k], j = now, 0
                    g_phase, g_left, g_work, g_start = _PRE, pre_[k], pre_[k], now
                else:
                    g_phase = _DONE
    tl.start_s[:], tl.end_s[:], tl.stall_s[:], tl.interference_s[:] = start_l, end_l, stall_l, interf_l
    tl.h2d_busy_s[:], tl.d2h_busy_s[:], tl.host_busy_s[:] = hbusy, dbusy, host_busy
    return events
