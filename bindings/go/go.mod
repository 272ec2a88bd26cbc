module dynq

go 1.19
