"""editfarm's test kit: what the tests and benchmarks need and the product never does.

- :mod:`editfarm_testing.api`: in-memory API services (``fake_services``) and test settings;
- :mod:`editfarm_testing.workers`: stand-in renderer and work queue, a look at the finisher;
- :mod:`editfarm_testing.outbox`: the in-memory webhook outbox, reading and setting any outbox;
- :mod:`editfarm_testing.webhooks`: receivers that fail on purpose or answer in a scripted order,
  built on the product's one receiver (``cli.webhook_receiver``, which ``make demo`` uses);
- :mod:`editfarm_testing.tcpproxy`: a loopback TCP forwarder that can refuse or swallow connections;
- :mod:`editfarm_testing.cluster`: restarting a local cluster's Redis or API, looking inside its processes;
- :mod:`editfarm_testing.catalog`: the two-model catalog (non-legacy names) the integration suites run on;
- :mod:`editfarm_testing.sentinel`: a Redis primary, replica and three sentinels, for failovers.

Product packages (broker, storage, api, workers, cli) never import it
(tests/test_testkit_boundary.py checks every module).
"""
