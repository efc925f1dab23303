"""The stages of a build; each is given artifacts and returns artifacts."""
