// Command docker-machine-driver-fakecloud is the fakecloud Docker Machine driver
// plugin (see package plugin).
package main

import "machinist.dev/fakecloud/plugin"

func main() {
	plugin.Main()
}
