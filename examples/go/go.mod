module cluster-lb/examples/go

go 1.19
