"""The control side: from a command line or clusterctl.toml to units that systemd runs, and operating them.

`plan` validates every decision first (one table of options, `PlanOptions`; the plan is kept beside the
units as NAME.plan.json); `generate` renders the units from templates/; `systemd` is how we talk to it
(the host's, a user manager, or a `sandbox`); `ops`, `converge`, `rollout`, `delivery` and `registry`
operate installed clusters; `deploy` ships a release to a fleet through Ansible. Nothing here runs inside a
worker: that is clusterctl.worker, which this side starts through the units it writes.
"""
