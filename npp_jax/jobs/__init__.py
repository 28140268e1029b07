"""The jobs: one module per `config.mode` (train, sample, evaluate, extract) and the
`convert` and `bench` command lines. Jobs import the library; nothing imports a job."""
