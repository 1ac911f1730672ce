"""`make demo`: the whole path on one machine, checked as a user would check it.

Starts a local cluster, starts a webhook receiver on loopback, submits an edit
of ``examples/sample.png``, shows progress, waits for the signed webhook and
verifies its signature with the reference ``standardwebhooks`` package, saves
the output image and prints its path and URL.
"""

from __future__ import annotations

import json
from pathlib import Path

from cli.cluster import ROOT, ClusterConfig, LocalCluster
from cli.webhook_receiver import WebhookReceiver

SAMPLE = ROOT / "examples" / "sample.png"


def run_demo(workdir: Path, out: Path) -> int:
    """Run the demo; returns a process exit code (0 = everything checked out)."""
    from editfarm_client import Client
    from standardwebhooks.webhooks import Webhook

    from cli.jobs import follow

    print("starting a local cluster (Redis, S3 server, API, render worker, webhook worker)…")
    # die_with_parent: a SIGKILLed demo leaves no cluster behind (cli/lifetime.py)
    with LocalCluster(ClusterConfig(workdir=workdir, die_with_parent=True)) as cluster, WebhookReceiver() as receiver, \
            Client(cluster.api_url, api_key=cluster.api_key()) as client:
        print(f"API {cluster.api_url}  docs {cluster.api_url}/docs")
        job = client.edit(SAMPLE, "make the sky purple", seed=7, steps=8, true_cfg_scale=4.0,
                          output_format="png", webhook=receiver.url)
        print(f"submitted job {job.id}")
        job = follow(client, job)  # the SDK's live event stream, with a progress bar
        if job.status != "succeeded":
            print(f"job ended {job.status}: {job.error}")
            return 1
        hook = receiver.received.get(timeout=60)
        payload = Webhook(cluster.webhook_secret).verify(hook.body, hook.headers)
        print(f"webhook {hook.headers['webhook-id']} received: {payload['type']} — signature verified")
        output = job.outputs[0]
        (path,) = client.download(output, out)  # checked against the job's sha256 and size
        print(json.dumps({"output": str(path), "url": output.url, "width": output.width,
                          "height": output.height, "sha256": output.sha256}, indent=2))
        return 0
