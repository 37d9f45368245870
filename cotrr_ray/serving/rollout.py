"""The rollout controller's serving side, Ray-free: promotion through the registry and the admin API.

`RegistryPromoter` is the controller's `Promoter` (experiments.controller): promotion points the
registry's `production` alias at what `candidate` names, by compare-and-swap, so Scorers following
`<registry>/<model>@production` swap to the winner within their alias poll interval.

`AdminAPI` is what the Router's admin routes call (deployments.py): operator commands over HTTP,
allowed only with the admin bearer token (`ADMIN_TOKEN_ENV` in the Router's environment, compared in
constant time). Without that variable the admin API is off (403 for everyone); a rerank client,
which holds no token, gets 401 without a token and 403 with a wrong one, and so cannot change a
rollout. The command goes into the same queue as the CLI's (`experiments.controller.submit_command`),
and the controller applies it at its next tick.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cotrr_ray.bundles.registry import Registry
from cotrr_ray.experiments import controller as C
from cotrr_ray.experiments.rollout import check_experiment_id
from cotrr_ray.serving.errors import error_body

ADMIN_TOKEN_ENV = "COTRR_ADMIN_TOKEN"
ADMIN_BODY_LIMIT = 16 * 1024


class RegistryPromoter:
    """Promotion = the registry's `target` alias (production) takes what `source` (candidate) names, by CAS."""

    def __init__(self, registry_uri: str, model: str, *, source: str = "candidate", target: str = "production"):
        self.registry = Registry(registry_uri).require()
        self.model, self.source, self.target = model, source, target

    def promote(self, reason: str) -> str:
        bundle_id = self.registry.resolve(self.model, self.source)
        head = self.registry.head(self.model, self.target)
        if head is None or head.bundle_id != bundle_id:  # idempotent: a resumed controller re-acts
            expected = head.bundle_id if head else None
            self.registry.set_alias(self.model, self.target, bundle_id, expected=expected, reason=reason[:500])
        return bundle_id


class AdminCommandIn(BaseModel):
    """Body of ``POST /admin/experiments/{id}/{action}``."""

    model_config = ConfigDict(extra="forbid")

    operator: str = Field(min_length=1, max_length=64, description="Who asks (recorded as operator:<name>).")
    reason: str = Field("", max_length=1000, description="Why (recorded with the decision).")
    stage: str | None = Field(None, max_length=64, description="force: the stage to go to.")


ACTIONS = ("pause", "resume", "abort", "force")


class AdminAPI:
    """Admin routes' logic: (status, JSON body) for each call."""

    def __init__(self, log_uri: str | None, *, token: str | None = None):
        self.log_uri = log_uri
        self.token = token if token is not None else os.environ.get(ADMIN_TOKEN_ENV) or None

    def authorize(self, authorization: str | None) -> tuple[int, dict[str, Any]] | None:
        """None when the bearer token is right; else the 401/403 answer."""
        if not self.token:
            return 403, error_body("forbidden", f"the admin API is off: set {ADMIN_TOKEN_ENV} on the Router")
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return 401, error_body("unauthorized", "admin routes need 'Authorization: Bearer <admin token>'")
        if not C.token_matches(presented.strip(), self.token):
            return 403, error_body("forbidden", "wrong admin token")
        return None

    def command(self, experiment_id: str, action: str, authorization: str | None, body: bytes):
        denied = self.authorize(authorization)
        if denied is not None:
            return denied
        if action not in ACTIONS:
            return 404, error_body("not_found", f"unknown action {action!r}; one of {list(ACTIONS)}")
        try:
            check_experiment_id(experiment_id)
            req = AdminCommandIn.model_validate_json(body or b"{}")
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(p) for p in err["loc"]) or None
            return 422, error_body("invalid_request", err["msg"], field)
        except ValueError as e:
            return 422, error_body("invalid_request", str(e), "experiment_id")
        if self.log_uri is None:
            return 404, error_body("not_found", "no event log: the controller keeps its state beside it")
        if C.Store(self.log_uri, experiment_id).last_record() is None:
            return 404, error_body("not_found", f"no controller has started experiment {experiment_id!r}")
        cmd = C.new_command(action, stage=req.stage, reason=req.reason, actor=f"operator:{req.operator}")
        why = C.submit_command(self.log_uri, experiment_id, cmd)
        if why is not None:
            return 409, error_body("conflict", why)
        return 202, {"queued": cmd.model_dump(), "applies": "at the controller's next tick"}

    def experiments(self, configured: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """``GET /v1/experiments``: the controllers' experiments and the one the Router is configured for."""
        listed = C.experiments(self.log_uri) if self.log_uri else []
        salt = configured.get("experiment_salt")
        if salt is not None and all(e["experiment_id"] != salt for e in listed):
            listed.append({"experiment_id": salt, "state": None, "stage": None, "updated_at": None, "plan": None})
        for e in listed:
            e["configured"] = e["experiment_id"] == salt
        return 200, {"experiments": listed, "routing": configured}
