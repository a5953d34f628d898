"""pwself_reference: DINO and PW-Self pretraining and evaluation on top of patchaug."""
