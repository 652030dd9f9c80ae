// Command goecho is a fast gRPC echo server for the data-plane benchmark.
//
// It answers every method, known or not, through grpc.UnknownServiceHandler and a
// pass-through codec: each request message is sent back as it arrived, byte for byte, without
// any protobuf decoding. So /echo.Echo/UnaryEcho (see protos/echo.proto) works for ghz and for
// h2load alike, and so does any other path. Streams are echoed message by message.
package main

import (
	"errors"
	"flag"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"runtime"
	"syscall"

	"google.golang.org/grpc"
	"google.golang.org/grpc/mem"
)

const maxMessageSize = 256 << 20 // 256 MiB

// rawMessage holds one gRPC message as the transport delivered it.
type rawMessage struct {
	data mem.BufferSlice
}

// rawCodec moves message bytes in and out without copying or decoding them. Unmarshal takes a
// reference on the received buffers; Marshal hands that reference back to the transport, which
// releases it once the bytes are written.
type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	msg, ok := v.(*rawMessage)
	if !ok {
		return nil, errors.New("goecho: codec only handles raw messages")
	}
	data := msg.data
	msg.data = nil
	return data, nil
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	msg, ok := v.(*rawMessage)
	if !ok {
		return errors.New("goecho: codec only handles raw messages")
	}
	data.Ref()
	msg.data = data
	return nil
}

// Name is "proto" so that the codec stands in for the default one.
func (rawCodec) Name() string { return "proto" }

// echo sends back every message of the stream until the client half-closes.
func echo(_ any, stream grpc.ServerStream) error {
	for {
		msg := &rawMessage{}
		if err := stream.RecvMsg(msg); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if err := stream.SendMsg(msg); err != nil {
			msg.data.Free()
			return err
		}
	}
}

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "host:port to listen on")
	flag.Parse()

	lis, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatalf("goecho: listen %s: %v", *addr, err)
	}
	server := grpc.NewServer(
		grpc.ForceServerCodecV2(rawCodec{}),
		grpc.UnknownServiceHandler(echo),
		grpc.MaxRecvMsgSize(maxMessageSize),
		grpc.MaxSendMsgSize(maxMessageSize),
		grpc.NumStreamWorkers(uint32(runtime.GOMAXPROCS(0))),
	)

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-stop
		server.Stop()
	}()

	log.Printf("goecho: serving on %s", lis.Addr())
	if err := server.Serve(lis); err != nil {
		log.Fatalf("goecho: serve: %v", err)
	}
}
