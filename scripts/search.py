"""The Optuna proposer (loop.py --agent optuna): TPE by default, CMA-ES with --sampler cmaes.

It searches train.py's active hyperparameter block (proposers.SEARCH_SPACE, plus the window
pattern): learning rates and other scales on a log scale from half to twice their values at the
study's start, integers as integers, batch sizes as powers of two, the window pattern as a choice. Each
iteration asks the study for one trial, writes all of its values into train.py (a patch, like any
proposal), and tells the study the result once the loop has decided: the judged val_bpb (the
mean of both runs when a marginal result was confirmed), a failed trial for a crash or a
proposal that never trained. The loop's baseline enters the study as a finished trial, so the
samplers start from the human's configuration, and CMA-ES is centred on it.

The study lives in SQLite in the loop's folder (runs/loop/optuna.db) unless --study-storage
names another (a file on a shared filesystem, or a database URL): lanes share one study that
way, and each lane asks for its own trial (TPE's constant liar keeps them apart). A trial is
tagged with its loop (the session tag) and iteration when asked, so a loop killed at any point
and resumed takes up the same trial again: nothing is asked twice.

The search space is fixed when the study is created (stored in the study) so that every trial
samples the same distributions, wherever train.py has moved since.

Usage (from loop.py; needs `uv sync --group search`):
    import search
    proposal = search.propose(state, train_text, manifest)
    search.tell(state)      # after the decision, idempotent
"""

import ast
import difflib
import fcntl
import json
import math
import warnings
from pathlib import Path

import common
import proposers

SAMPLERS = ("tpe", "cmaes")
STUDY_FILE = "optuna.db"  # in runs/loop/, beside state.json
# The neighbourhood the random proposer moves in (proposers.FACTORS and STEPS), around the baseline.
# Wider boxes cost TPE experiments on the bowl (benchmarks/search_effectiveness.py, 20 seeds: with
# x3 and +/-0.25 its mean regret after 30 experiments was 0.0246, with these 0.0150; random's 0.0173).
SCALE_SPREAD = 2.0  # rates and scales range over [value / 2, value * 2], log-uniform
STEP_SPREAD = 0.2  # fractions range over value +/- 0.2 within their bounds
POWER_SPREAD = 1  # powers of two range over 2**(k - 1) .. 2**(k + 1)
WINDOW_PATTERNS = ("L", "SL", "SSL", "SSSL", "SSSSL")
MAX_ASKS = 100  # asks per iteration for a configuration train.py accepts (the others are pruned)
SQLITE_TIMEOUT_SECONDS = 60  # lanes write one SQLite file: wait for the lock rather than fail


def active_settings(text, profile):
    """{NAME: (line index, value)} for the UPPER_CASE numbers and strings in effect under `profile`
    (proposers.active_assignments, plus string settings such as WINDOW_PATTERN)."""
    found = dict(proposers.active_assignments(text, profile))
    inside = None
    for index, line in enumerate(text.splitlines()):
        header = proposers.PROFILE_BLOCK.match(line)
        if header:
            inside = common.profile_block_applies(header.group("condition"), profile)
            continue
        if line.strip() and not line[0].isspace():
            inside = None
        match = proposers.ASSIGNMENT.match(line)
        if not match or (match.group("indent") and not inside):
            continue
        try:
            value = ast.literal_eval(match.group("value").strip())
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, str):
            found[match.group("name")] = (index, value)
    return found


def rounded(number):
    return float(f"{number:.3g}")


def build_space(text, profile):
    """The search space around train.py's current values: a list of JSON-able dimensions."""
    settings = {name: value for name, (_, value) in active_settings(text, profile).items()}
    space = []
    for name, (kind, low, high) in proposers.SEARCH_SPACE.items():
        value = settings.get(name)
        if value is None:
            continue
        if kind == "factor" and value > 0:
            space.append({"name": name, "kind": "log", "low": rounded(max(low, value / SCALE_SPREAD)),
                          "high": rounded(min(high, value * SCALE_SPREAD))})
        elif kind == "integer":
            space.append({"name": name, "kind": "int", "low": max(low, value // 2), "high": min(high, value * 2)})
        elif kind == "power_of_two" and value > 0 and int(value) & (int(value) - 1) == 0:
            k = int(value).bit_length() - 1
            space.append({"name": name, "kind": "log2", "low": max(int(math.log2(low)), k - POWER_SPREAD),
                          "high": min(int(math.log2(high)), k + POWER_SPREAD)})
        elif kind == "step":
            space.append({"name": name, "kind": "uniform", "low": rounded(max(low, value - STEP_SPREAD)),
                          "high": rounded(min(high, value + STEP_SPREAD))})
    pattern = settings.get("WINDOW_PATTERN")
    if isinstance(pattern, str) and set(pattern) <= set("SL"):
        space.append({"name": "WINDOW_PATTERN", "kind": "choice",
                      "choices": sorted(set(WINDOW_PATTERNS) | {pattern}, key=lambda p: (len(p), p))})
    return space


def parameter(dimension):
    """The Optuna parameter name of a dimension (powers of two are searched by their exponent)."""
    return f"log2({dimension['name']})" if dimension["kind"] == "log2" else dimension["name"]


def distribution(dimension):
    import optuna

    kind = dimension["kind"]
    if kind == "log":
        return optuna.distributions.FloatDistribution(dimension["low"], dimension["high"], log=True)
    if kind == "uniform":
        return optuna.distributions.FloatDistribution(dimension["low"], dimension["high"])
    if kind in ("int", "log2"):
        return optuna.distributions.IntDistribution(dimension["low"], dimension["high"])
    return optuna.distributions.CategoricalDistribution(dimension["choices"])


def to_settings(space, params):
    """train.py's values from a trial's parameters."""
    values = {}
    for dimension in space:
        value = params[parameter(dimension)]
        if dimension["kind"] == "log2":
            value = 2 ** int(value)
        elif dimension["kind"] in ("log", "uniform"):
            value = rounded(value)  # as train.py will carry it (proposers.format_number)
        values[dimension["name"]] = value
    return values


def to_params(space, settings):
    """A trial's parameters from train.py's values (for the baseline's trial and CMA-ES's x0)."""
    params = {}
    for dimension in space:
        value = settings[dimension["name"]]
        if dimension["kind"] == "log2":
            value = int(value).bit_length() - 1
        elif dimension["kind"] in ("log", "uniform"):
            value = min(dimension["high"], max(dimension["low"], float(value)))
        params[parameter(dimension)] = value
    return params


def rewrite(text, profile, values):
    """train.py with `values` written into its active settings, comments kept in their column."""
    active = active_settings(text, profile)
    lines = text.splitlines(keepends=True)
    for name, value in values.items():
        index, old = active[name]
        match = proposers.ASSIGNMENT.match(lines[index].rstrip("\n"))
        if value == old:
            continue
        written = json.dumps(value) if isinstance(value, str) else proposers.format_number(value, match.group("value"))
        head = f"{match.group('indent')}{name}{match.group('gap')}{written}"
        comment = match.group("comment") or ""
        if comment:
            column = lines[index].index(comment.lstrip())
            comment = " " * max(1, column - len(head)) + comment.lstrip()
        lines[index] = head + comment + ("\n" if lines[index].endswith("\n") else "")
    return "".join(lines)


# ---------------------------------------------------------------------------
# The study


def storage_url(options):
    return options.get("study_storage") or f"sqlite:///{common.RUNS_DIR / 'loop' / STUDY_FILE}"


def open_storage(url):
    import optuna

    if not url.startswith("sqlite:///"):
        return optuna.storages.RDBStorage(url)
    # Lanes starting at once would both create the schema (alembic: UNIQUE constraint failed): one at a time.
    lock = Path(url[len("sqlite:///"):] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_SECONDS}})


def make_sampler(name, seed, space=None, x0=None):
    """A fresh sampler; its state is rebuilt from the stored trials, so a resumed loop carries on."""
    import optuna

    if name == "cmaes":
        with warnings.catch_warnings():  # Optuna 5 marks x0, seed and with_margin as moving to OptunaHub
            warnings.simplefilter("ignore")
            return optuna.samplers.CmaEsSampler(x0=x0, seed=seed, n_startup_trials=1, with_margin=True,
                                                warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)  # Optuna's defaults: 10 random trials first


def load_study(storage, name, sampler_name, seed, text=None, profile=None):
    """The study `name` (created from train.py's current block when new) and its space."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    probe = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True,
                                sampler=optuna.samplers.RandomSampler())
    space = probe.user_attrs.get("space")
    if space is None:
        if text is None:
            raise common.Refusal(f"study {name} has no search space yet: the loop creates it at the baseline")
        space = build_space(text, profile)
        if not space:
            raise common.Refusal("train.py's hyperparameter block has no setting the Optuna proposer can search")
        settings = {name: value for name, (_, value) in active_settings(text, profile).items()}
        probe.set_user_attr("space", space)
        probe.set_user_attr("x0", to_params(space, settings))
    x0 = probe.user_attrs.get("x0")
    sampler = make_sampler(sampler_name, seed, space, x0)
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler), space


def study_name(state):
    return state["options"].get("study_name") or state["tag"]


def owner(state):
    """Who asked a trial: the loop's session tag (unique per lane), so a resumed loop finds its own."""
    return state["tag"]


def ask(study, space, who, iteration, max_seq_len):
    """The trial for (who, iteration): the one asked before a kill, else a new one whose values
    train.py accepts (inconsistent batch sizes are told as pruned and asked again)."""
    import optuna

    for frozen in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if frozen.user_attrs.get("owner") == who and frozen.user_attrs.get("iteration") == iteration:
            trial = optuna.trial.Trial(study, frozen._trial_id)
            return trial, suggest(trial, space)
    for _ in range(MAX_ASKS):
        trial = study.ask()
        trial.set_user_attr("owner", who)
        trial.set_user_attr("iteration", iteration)
        values = suggest(trial, space)
        if proposers.consistent(values, max_seq_len):
            return trial, values
        trial.set_user_attr("pruned_because", "train.py refuses this batch size combination")
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    raise common.Refusal(f"no configuration train.py accepts after {MAX_ASKS} asks: the search space is too tight")


def suggest(trial, space):
    """train.py's values for a trial (re-suggesting a resumed trial's parameters returns what it drew)."""
    for dimension in space:
        name, kind = parameter(dimension), dimension["kind"]
        if kind in ("log", "uniform"):
            trial.suggest_float(name, dimension["low"], dimension["high"], log=kind == "log")
        elif kind in ("int", "log2"):
            trial.suggest_int(name, dimension["low"], dimension["high"])
        else:
            trial.suggest_categorical(name, dimension["choices"])
    return to_settings(space, trial.params)


def describe(old, new, limit=3):
    changes = [f"{name} {old[name]} -> {value}" for name, value in new.items() if old.get(name) != value]
    text = ", ".join(changes[:limit]) + (f" +{len(changes) - limit} more" if len(changes) > limit else "")
    return text or "no change"


def propose(state, train_text, manifest):
    """One proposal {source, description, hypothesis, patch, trial} from the study."""
    options = state["options"]
    sampler = options.get("sampler") or "tpe"
    profile = manifest.get("profile")
    study, space = load_study(open_storage(storage_url(options)), study_name(state), sampler,
                              seed_for(options.get("seed") or 0, state["iteration"]), train_text, profile)
    trial, values = ask(study, space, owner(state), state["iteration"], manifest.get("max_seq_len"))
    current = {name: value for name, (_, value) in active_settings(train_text, profile).items()}
    patched = rewrite(train_text, profile, values)
    lines, after = train_text.splitlines(keepends=True), patched.splitlines(keepends=True)
    return {"source": "optuna", "sampler": sampler, "trial": trial.number, "study": study_name(state),
            "description": f"{sampler} trial {trial.number}: {describe(current, values)}",
            "hypothesis": f"{sampler.upper()} trial {trial.number} of study {study_name(state)} "
                          f"({storage_label(options)}): {describe(current, values, limit=len(values))}",
            "patch": "".join(difflib.unified_diff(lines, after, "a/train.py", "b/train.py")) or None}


def storage_label(options):
    url = storage_url(options)
    return url.split("://", 1)[0] + "://..." + url[-40:] if len(url) > 60 else url


def seed_for(seed, iteration):
    """A sampler seed per iteration: a resumed loop draws what the killed one would have."""
    return (int(seed) * 100003 + int(iteration)) % (2**31)


def tell(state):
    """Report the current iteration's outcome to the study (idempotent; a finished trial is left alone).
    The baseline (iteration 0) enters as a finished trial with the human's values."""
    import optuna

    current, options = state["current"], state["options"]
    proposal = current.get("proposal") or {}
    runs = current.get("runs") or []
    result = runs[-1] if runs else None
    value = result["val_bpb"] if result and result.get("status") == "ok" and result.get("val_bpb") is not None \
        else None
    storage = open_storage(storage_url(options))
    if state["iteration"] == 0:
        if value is None:
            return
        manifest = common.load_manifest() or {}
        study, space = load_study(storage, study_name(state), options.get("sampler") or "tpe", 0,
                                  common.TRAIN_FILE.read_text(), manifest.get("profile"))
        if any(t.user_attrs.get("owner") == owner(state) and t.user_attrs.get("iteration") == 0
               for t in study.get_trials(deepcopy=False)):
            return
        study.add_trial(optuna.trial.create_trial(
            params=study.user_attrs["x0"], distributions={parameter(d): distribution(d) for d in space},
            value=value, user_attrs={"owner": owner(state), "iteration": 0, "baseline": True}))
        return
    if proposal.get("source") != "optuna":
        return
    study = optuna.load_study(study_name=study_name(state), storage=storage)
    trial = study.get_trials(deepcopy=False)[proposal["trial"]]
    trial_id = trial._trial_id
    if trial.state.is_finished():
        return
    if value is None:
        storage.set_trial_user_attr(trial_id, "failure", str(current.get("reason") or (result or {}).get("triage")))
        study.tell(proposal["trial"], state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    else:
        storage.set_trial_user_attr(trial_id, "run", (result or {}).get("run_dir"))
        storage.set_trial_user_attr(trial_id, "decision", (result or {}).get("decision"))
        study.tell(proposal["trial"], value, skip_if_finished=True)


def installed():
    """True when optuna is importable (the `search` dependency group)."""
    import importlib.util

    return importlib.util.find_spec("optuna") is not None and importlib.util.find_spec("cmaes") is not None

