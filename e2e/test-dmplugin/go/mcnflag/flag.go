// Package mcnflag declares the create flags a driver plugin announces through
// GetCreateFlags. The package name, the type names and the fields (names, types and
// order) are those of docker/machine's libmachine/mcnflag: gob sends the names
// (`*mcnflag.StringFlag`, ...) and the field numbers on the wire.
package mcnflag

// Flag is one create flag. String returns its name, Default its default value
// (nil for a BoolFlag).
type Flag interface {
	String() string
	Default() interface{}
}

// StringFlag is a flag with a string value.
type StringFlag struct {
	Name   string
	Usage  string
	EnvVar string
	Value  string
}

func (f StringFlag) String() string       { return f.Name }
func (f StringFlag) Default() interface{} { return f.Value }

// StringSliceFlag is a flag that may be given several times.
type StringSliceFlag struct {
	Name   string
	Usage  string
	EnvVar string
	Value  []string
}

func (f StringSliceFlag) String() string       { return f.Name }
func (f StringSliceFlag) Default() interface{} { return f.Value }

// IntFlag is a flag with an int value.
type IntFlag struct {
	Name   string
	Usage  string
	EnvVar string
	Value  int
}

func (f IntFlag) String() string       { return f.Name }
func (f IntFlag) Default() interface{} { return f.Value }

// BoolFlag is a switch; it has no Value field (false unless given).
type BoolFlag struct {
	Name   string
	Usage  string
	EnvVar string
}

func (f BoolFlag) String() string       { return f.Name }
func (f BoolFlag) Default() interface{} { return nil }
