"""The layers: experts, routers, losses, dispatch, SparseMoE and MHMoE. They know nothing about training."""
