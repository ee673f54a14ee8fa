"""Device kernels of sgl-merge: the in-place merge of each merge group's logits rows (`merge_logits`)."""
