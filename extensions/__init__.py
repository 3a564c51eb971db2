"""What goes beyond the assignment: one module per feature (see extensions/README.md). A script
meets them in three calls:

    extensions.add_flags(parser, SCRIPT)         # each feature's flags, in a --help group of its own
    extensions.check(args, world_size, SCRIPT)   # each feature's checks, then those between features
    parts = extensions.configure(args, SCRIPT, parts, replica, plan)   # once, before the loop

`parts` is the script's own record of what a feature may replace (its Parts: the communicator,
the gradient average, what wraps a step's compute, the epoch), filled with the assignment's own
functions; configure replaces those that the flags ask for. At the defaults it replaces nothing.
--trace (extensions/timeline.py) is every script's: utils.setup starts it, configure hands the
script a communicator that times each call, and the script's report() ends it.
"""
import utils
from extensions import async_ps, compression, drift, elastic, fed_algorithms, stragglers, timeline

FEATURES = {  # the features each script takes, in the order --help shows them
    "dist_sgd_serverless": (compression, stragglers, elastic),
    "dist_sgd_param_server": (async_ps, stragglers, elastic),
    "fed_avg": (fed_algorithms, drift, elastic),
}


def add_flags(parser, script):
    for feature in FEATURES[script]:
        feature.add_flags(parser.add_argument_group("beyond the assignment: " + feature.TITLE))


def configure(args, script, parts, replica, plan, data=None):
    """Fill the script's `parts` from the flags, once, before the loop; returns it. `plan`: what every
    epoch follows (fed_avg.py: the Federation); `data`: fed_avg.py's (train, test), for the drift."""
    if script == "fed_avg":
        return configure_fed_avg(args, parts, replica, plan, data)
    if script == "dist_sgd_serverless" and args.compress != "none":  # compressors keep state: built once
        parts.average_ = compression.METHODS[args.compress](replica.model, args)
    if script == "dist_sgd_param_server" and args.mode != "sync":
        parts.train_epoch = async_ps.MODES[args.mode]
    parts.straggle = stragglers.slowdown(args, parts.comm.Get_rank(), replica.flat_params.device)
    if args.elastic:  # it wraps the epoch and the average chosen above
        elastic.configure(script, parts, replica, plan)
    parts.comm = timeline.watch(parts.comm, utils.TRACER)  # --trace: last, to time every call
    return parts


def configure_fed_avg(args, parts, replica, fed, data):
    if args.algorithm != "fedavg":  # a variant amends some of FedAvg's hooks, keeps the others
        parts.algorithm = fed_algorithms.VARIANTS[args.algorithm](parts.algorithm)
    if args.measure_drift:
        (_, y_train), test = data
        parts.meter = drift.DriftMeter(replica.model, fed.shards, y_train, fed.host, test)
    if args.elastic:
        elastic.survive_clients(parts, replica, fed)
    timeline.name_clients(utils.TRACER, parts.comm.Get_rank(), fed.host)
    parts.comm = timeline.watch(parts.comm, utils.TRACER)
    return parts


def check(args, world_size, script):
    """Every feature's own check (on every rank, so that all stop together), then the pairs of
    features that do not go together."""
    for feature in FEATURES[script]:
        feature.check(args, world_size, script)
    if script == "dist_sgd_serverless" and args.elastic and args.compress != "none":
        utils.fail("--elastic works with the uncompressed average only (--compress none)")
    if script == "fed_avg" and args.elastic and args.algorithm == "scaffold":
        utils.fail("--elastic cannot move SCAFFOLD's client control variates, which die with their rank: "
                   "use --algorithm fedavg, fedprox, fedavgm, fedrs or fedlc")
