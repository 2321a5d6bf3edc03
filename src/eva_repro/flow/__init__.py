"""Rectified flow, outside the network (SiT's transport): the time convention, the prediction
type's mapping onto the velocity, target scaling and the loss (`transport`); the samplers
(`sampling`)."""
