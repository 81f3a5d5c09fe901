"""The curves stage (plots/train.tsv -> plots/train.png): the training curves as an image
(curves). Imports only pgolf.shared."""
