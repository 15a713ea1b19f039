"""The sweep: Ray Tune with ASHA over learning rate x freeze depth, each trial one training
run, the winner tested and registered."""
