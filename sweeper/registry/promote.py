"""`python -m sweeper.promote`: rank the registered adapters, verify the best, move `champion`.

Policy: the objective the versions' study optimised, as their tags record it: the lowest
fine-tuning validation error (`objective_metric`) among the versions whose retained error
is within tolerance of the base model's (`retained_metric` <= 1 + `retained_tolerance`;
no such bound for a study without an original set); `--metric`, `--retained-metric`,
`--tolerance` change it. It ranks the versions of one study, the most recent
(`--study`, `--all-studies` to choose). The winner is verified (verify.py) before any alias moves:
it gets `champion`, the version it replaces gets `previous`, `--rollback` swaps them back.
Each move is recorded in tags on the version that becomes champion.

Runs from a plain shell against the sweep's tracking URI: `--tracking-uri`, else
`MLFLOW_TRACKING_URI`, else `tracking.uri` of conf/ (`sqlite:///mlflow.db` here).
Exit status: 0 done (or dry run), 1 verification failed, 2 bad input; nothing moves on 1 or 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from datetime import datetime, timezone

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sweeper import config, devices, objective, tracking
from sweeper.config import Config, ConfigError
from sweeper.registry import models
from sweeper.registry.models import ModelError
from sweeper.registry.verify import VerificationError, verify
from sweeper.registry.versions import CHAMPION, NO_RETAINED_METRIC, PREVIOUS, model_name


@dataclass(frozen=True)
class Policy:
    """What wins. Unset fields come from the versions' own tags: the objective their
    study optimised (`objective_metric`, `retained_metric`, `retained_tolerance`)."""

    metric: str | None = None
    retained_metric: str | None = None  # None after `resolved`: no retained accuracy (no original set)
    tolerance: float | None = None
    study: str | None = None

    def __str__(self) -> str:
        text = f"lowest {self.metric}"
        if self.retained_metric is not None:
            bound = f"{1 + self.tolerance:g}" + ("" if self.retained_metric.endswith("_ratio") else " x base")
            text += f" with {self.retained_metric} <= {bound}"
        if self.study is None:
            return text + ", all studies"
        return text + (f", study {self.study}" if self.study else ", single trials (no study)")

    def resolved(self, versions: list[ModelVersion]) -> Policy:
        """Fill the unset fields from the versions' tags; they must agree."""

        def tagged(key: str, flag: str) -> str:
            found = sorted({v.tags.get(key, "") for v in versions})
            if len(found) != 1 or not found[0]:
                raise ConfigError(
                    f"{flag}: the versions were registered with {key} {found}: pass {flag} (or --study)"
                )
            return found[0]

        metric = self.metric or tagged("objective_metric", "--metric")
        retained = self.retained_metric
        if retained is None:
            retained = tagged("retained_metric", "--retained-metric")
        retained = None if retained == NO_RETAINED_METRIC else retained
        tolerance = self.tolerance
        if tolerance is None and retained is not None:
            tolerance = float(tagged("retained_tolerance", "--tolerance"))
        return Policy(metric, retained, tolerance, self.study)


@dataclass
class Candidate:
    version: ModelVersion
    value: float  # the policy's metric; inf when the version lacks it
    eligible: bool
    why_not: str = ""


def rank(client: MlflowClient, name: str, policy: Policy) -> tuple[Policy, list[Candidate]]:
    """The policy, resolved, and every version of `name` (of the study, if set): eligible
    ones first, best first."""
    versions = client.search_model_versions(f"name = '{name}'")
    if policy.study is not None:
        versions = [v for v in versions if v.tags.get("study_name", "") == policy.study]
    if not versions:
        where = f" in study {policy.study!r}" if policy.study else ""
        raise ConfigError(f"registered model {name!r} has no versions{where}: run a sweep first")
    policy = policy.resolved(versions)
    candidates = [_candidate(v, policy) for v in versions]
    return policy, sorted(candidates, key=lambda c: (not c.eligible, c.value, -int(c.version.version)))


def _candidate(version: ModelVersion, policy: Policy) -> Candidate:
    tags = version.tags
    metrics = {key: float(value) for key, value in tags.items() if _is_number(value)}
    value = metrics.get(policy.metric, math.inf)
    if policy.metric not in metrics:
        return Candidate(version, value, False, f"no {policy.metric} tag")
    if policy.retained_metric is None:
        return Candidate(version, value, True)
    try:
        excess = objective.retained_excess(
            metrics, policy.retained_metric, policy.tolerance, "--retained-metric"
        )
    except ConfigError:
        return Candidate(version, value, False, f"no {policy.retained_metric} tag")
    return Candidate(version, value, excess <= 0, "" if excess <= 0 else "retained error above tolerance")


def table(candidates: list[Candidate], policy: Policy, limit: int = 20) -> str:
    rows = [
        f"{'#':>3} {'version':>7} {'study':>12} {'trial':>5} {'rank':>4} {'alpha':>7} {'lr':>8} "
        f"{policy.metric:>24} {policy.retained_metric or 'retained (none)':>24}  eligible  aliases"
    ]
    for position, candidate in enumerate(candidates[:limit], 1):
        tags = candidate.version.tags
        rows.append(
            f"{position:>3} {candidate.version.version:>7} {tags.get('study_name', '-')[-12:]:>12}"
            f" {tags.get('trial_number', '-'):>5} {tags.get('lora.rank', '-'):>4}"
            f" {_short(tags.get('lora.alpha')):>7} {_short(tags.get('train.lr')):>8}"
            f" {_short(tags.get(policy.metric)):>24} {_short(tags.get(policy.retained_metric or '')):>24}"
            f"  {'yes' if candidate.eligible else 'no':<8}  {','.join(candidate.version.aliases) or '-'}"
            + (f"  ({candidate.why_not})" if candidate.why_not else "")
        )
    if len(candidates) > limit:
        rows.append(f"... and {len(candidates) - limit} more")
    return "\n".join(rows)


def promote(
    client: MlflowClient, name: str, policy: Policy, base: str | None, dry_run: bool, device: str = "cpu"
) -> int:
    policy, candidates = rank(client, name, policy)
    print(f"registered model {name!r}, policy: {policy}")
    print(table(candidates, policy))
    winner = candidates[0]
    if not winner.eligible:
        raise ConfigError(f"no version of {name!r} satisfies the policy ({policy})")
    if dry_run:
        print(f"dry run: would verify and promote version {winner.version.version}; nothing changed")
        return 0
    current = _alias(client, name, CHAMPION)
    _verify(client, winner.version, base, device)
    if current is not None and current.version == winner.version.version:
        print(f"version {winner.version.version} is already {CHAMPION}; nothing moved")
        return 0
    _move(client, name, winner.version, current, str(policy))
    return 0


def rollback(client: MlflowClient, name: str, base: str | None, device: str = "cpu") -> int:
    champion, previous = _alias(client, name, CHAMPION), _alias(client, name, PREVIOUS)
    if champion is None or previous is None:
        raise ConfigError(
            f"registered model {name!r} needs both {CHAMPION!r} and {PREVIOUS!r} aliases to roll back"
        )
    _verify(client, previous, base, device)
    _move(client, name, previous, champion, "rollback")
    return 0


def _verify(client: MlflowClient, version: ModelVersion, base: str | None, device: str) -> None:
    print(f"verifying version {version.version} (run {version.run_id}) on {device} ...")
    result = verify(client, version, base, device)
    print(f"  adapter sha256 matches its tag; base checkpoint {result.base_checkpoint} matches")
    for metric, (logged, found) in result.metrics.items():
        print(f"  {metric:<32} logged {logged:12.6f}  re-evaluated {found:12.6f}")
    print(f"  max relative difference {result.max_relative_difference:.1e} (tolerance 1e-4): verified")


def _move(
    client: MlflowClient, name: str, winner: ModelVersion, current: ModelVersion | None, how: str
) -> None:
    """`previous` to the old champion, `champion` to the winner, and a record on the winner."""
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current.version)
    client.set_registered_model_alias(name, CHAMPION, winner.version)
    record = {
        "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "promotion_policy": how,
        "promoted_from_version": str(current.version) if current is not None else "none",
    }
    for key, value in record.items():
        client.set_model_version_tag(name, winner.version, key, value)
    replaced = f"; version {current.version} is now {PREVIOUS}" if current is not None else ""
    print(f"promoted: {name} version {winner.version} is {CHAMPION} ({how}){replaced}")
    print(f"use it: models:/{name}@{CHAMPION}")


def _alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def _short(text: str | None) -> str:
    return "-" if text is None else f"{float(text):.4g}" if _is_number(text) else text


# --------------------------------------------------------------------------- command line


def parser(cfg: Config) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sweeper.promote",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--name",
        help=f"registered model (default: the registry's only one of ours, else {model_name(cfg)})",
    )
    p.add_argument("--study", help="rank the versions of this study (default: the most recent study)")
    p.add_argument("--all-studies", action="store_true", help="rank every version, whichever study made it")
    p.add_argument("--metric", help="lower is better (default: the objective the versions' study optimised)")
    p.add_argument("--retained-metric", help="default: the versions' study's (none without an original set)")
    p.add_argument("--tolerance", type=float, help="default: the versions' study's")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else tracking.uri of conf/")
    p.add_argument("--base-checkpoint", help="the base model file, when it moved since training")
    p.add_argument(
        "--device", default="cpu", help="where the verification re-evaluates: cpu (default), cuda[:N], auto"
    )
    p.add_argument("--dry-run", action="store_true", help="print the ranking and stop")
    p.add_argument("--rollback", action="store_true", help=f"swap {CHAMPION!r} and {PREVIOUS!r}")
    return p


def _most_recent_study(client: MlflowClient, name: str) -> str:
    """The study of the newest version: versions of different studies were evaluated on
    different data and objectives, so they are not ranked together unless asked."""
    versions = client.search_model_versions(f"name = '{name}'")
    newest = max(versions, key=lambda v: (v.creation_timestamp, int(v.version)), default=None)
    study = newest.tags.get("study_name", "") if newest is not None else ""
    print(
        f"ranking study {study!r}, the most recent (--study NAME or --all-studies to choose)"
        if study
        else "ranking single trials (no study), the most recent (--study NAME or --all-studies to choose)"
    )
    return study


def _default_name(client: MlflowClient, configured: str) -> str:
    """The registry's only model made by this tool (a sweep on one base model), else conf/'s name."""
    ours = [
        m.name for m in client.search_registered_models() if m.tags.get("created_by") == "pet-lora-sweeper"
    ]
    return ours[0] if len(ours) == 1 else configured


def main(argv: list[str] | None = None) -> int:
    cfg = config.composed()
    args = parser(cfg).parse_args(argv)
    try:
        if args.tolerance is not None and args.tolerance < 0:
            raise ConfigError(f"--tolerance must be >= 0, got {args.tolerance}")
        device = str(devices.resolve(args.device, "--device"))  # before any download
        mlflow.set_tracking_uri(tracking.resolve_uri(args.tracking_uri, cfg.tracking.uri))  # downloads too
        client = MlflowClient()
        args.name = args.name or _default_name(client, model_name(cfg))
        try:
            models.require_model(client, args.name, "--name")
        except ModelError as error:  # bad input (exit 2), not a failed verification
            raise ConfigError(str(error)) from None
        if args.rollback:
            return rollback(client, args.name, args.base_checkpoint, device)
        study = None if args.all_studies else args.study or _most_recent_study(client, args.name)
        policy = Policy(args.metric, args.retained_metric, args.tolerance, study)
        return promote(client, args.name, policy, args.base_checkpoint, args.dry_run, device)
    except (VerificationError, ModelError) as error:
        print(f"error: not promoted: {error}", file=sys.stderr)
        return 1
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
