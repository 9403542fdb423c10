module machinist.dev/fakecloud

go 1.22
